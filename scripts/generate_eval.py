"""Score models by what they generate: greedy answers to held-out prompts against their references.

    python scripts/generate_eval.py --models models/smollm2 serialization_dir/student \
        --data data/squad_heldout.jsonl --teacher models/smollm2 --output_dir runs/generation

For each model folder: exact match and token F1 (SQuAD's scorer), the response-token perplexity, and with
--teacher the KL(teacher || model) and top-1 agreement on the same tokens (tasks/answers.py). Writes
<output_dir>/<name>.json (the metrics) and <name>.predictions.jsonl per model, and prints a table over every model
scored in output_dir (table.md). A model whose JSON is there is not scored again (--force does): rerunning the
command after an interruption finishes the rest.
"""
import argparse
import glob
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distil.conversations import ConversationError  # noqa: E402
from distil.generation import load_chat_lm  # noqa: E402
from tasks.answers import format_table, read_examples, score_model  # noqa: E402
from utils import UserError, fail, logger, write_json_atomic  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Generate answers with each model and score them.")
    parser.add_argument("--models", nargs="+", required=True,
                        help="Model folders (causal LMs with their tokenizer and chat template).")
    parser.add_argument("--names", nargs="+", default=None,
                        help="A name for each model in the table and file names (default: the folder names).")
    parser.add_argument("--data", required=True,
                        help="Held-out conversations (.jsonl / .json / .parquet): the last assistant turn of each "
                             "is the reference; an 'answers' list adds other accepted answers.")
    parser.add_argument("--teacher", default=None, help="Teacher folder: adds the KL and agreement on the "
                                                        "reference answers' tokens.")
    parser.add_argument("--output_dir", required=True, help="Where the JSONs, predictions and table go.")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Longest generated answer.")
    parser.add_argument("--batch_size", type=int, default=8, help="Prompts generated (and scored) together.")
    parser.add_argument("--max_examples", type=int, default=None, help="Score only the first N examples.")
    parser.add_argument("--messages_column", default="messages", help="The field holding the message list.")
    parser.add_argument("--n_gpu", type=int, default=1, help="0: run on the CPU even when a GPU is there.")
    parser.add_argument("--force", action="store_true", help="Score again models already scored in output_dir.")
    return parser.parse_args(argv)


def model_names(args):
    if args.names is None:
        return [os.path.basename(os.path.normpath(m)) for m in args.models]
    if len(args.names) != len(args.models):
        raise UserError(f"--names gives {len(args.names)} names for {len(args.models)} --models")
    return args.names


def main(argv=None):
    import torch

    args = parse_args(argv)
    if args.max_new_tokens < 1 or args.batch_size < 1:
        fail("--max_new_tokens and --batch_size must be at least 1")
    try:
        names = model_names(args)
        if len(set(names)) != len(names):
            raise UserError(f"two models have the same name ({', '.join(names)}); give --names")
        examples = read_examples(args.data, args.messages_column, args.max_examples)
        teacher = load_chat_lm(args.teacher, "--teacher")[0] if args.teacher else None
    except (UserError, ConversationError) as exc:
        fail(str(exc))
    device = torch.device("cuda" if args.n_gpu > 0 and torch.cuda.is_available() else "cpu")
    if teacher is not None:
        teacher.to(device)
    os.makedirs(args.output_dir, exist_ok=True)
    for name, folder in zip(names, args.models):
        out = os.path.join(args.output_dir, f"{name}.json")
        if os.path.exists(out) and not args.force:
            logger.info("%s: already scored (%s)", name, out)
            continue
        try:
            model, tokenizer = load_chat_lm(folder, "--models")
        except ConversationError as exc:
            fail(str(exc))
        model.to(device)
        metrics, predictions = score_model(model, tokenizer, examples, teacher=teacher, batch_size=args.batch_size,
                                           max_new_tokens=args.max_new_tokens, device=device)
        with open(os.path.join(args.output_dir, f"{name}.predictions.jsonl"), "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in predictions)
        write_json_atomic(out, dict(metrics, model=folder, data=args.data, teacher=args.teacher,
                                    max_new_tokens=args.max_new_tokens))
        logger.info("%s: EM %.2f F1 %.2f response perplexity %.3f", name, metrics["exact"], metrics["f1"],
                    metrics["response_perplexity"])
    rows = []
    for path in sorted(glob.glob(os.path.join(args.output_dir, "*.json"))):
        with open(path) as f:
            rows.append((os.path.basename(path)[: -len(".json")], json.load(f)))
    table = format_table(rows)
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    logging.getLogger("transformers").setLevel(logging.ERROR)
    main()
