"""Inputs for experiments/gpu_checks.sh's train.py runs, made here without network: a corpus (the standard library's
prose, demo/data.py), a WordPiece tokenizer learnt from it, a BERT teacher with random weights saved as
safetensors, and a DistilBERT student config; then binarized_data.py and token_counts.py as a user runs them
(train.teacher.bin, heldout.teacher.bin, counts.pickle: binarized_data.py names its output after the tokenizer).

    python experiments/gpu_checks_setup.py --out /tmp/gpu_checks/inputs --size small
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SIZES = {"tiny": dict(lines=150, vocab=1000, hidden=32, layers=2, heads=2, max_len=64),
         "small": dict(lines=20000, vocab=8000, hidden=256, layers=4, heads=4, max_len=256)}


def main(argv=None):
    import subprocess

    import torch
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig

    from demo.data import split_heldout, stdlib_corpus
    from demo.models import train_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="Folder to write the inputs to.")
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="Corpus and model sizes.")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    os.makedirs(args.out, exist_ok=True)
    lines = stdlib_corpus()[: size["lines"]]
    train, heldout = split_heldout(lines)
    for name, part in (("train", train), ("heldout", heldout)):
        with open(os.path.join(args.out, f"{name}.txt"), "w") as f:
            f.write("\n".join(part) + "\n")
    teacher_dir = os.path.join(args.out, "teacher")
    tokenizer = train_tokenizer(train, teacher_dir, size["vocab"], size["max_len"])
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                               num_attention_heads=size["heads"], intermediate_size=4 * size["hidden"],
                               max_position_embeddings=size["max_len"])).save_pretrained(teacher_dir)
    DistilBertConfig(vocab_size=len(tokenizer), dim=size["hidden"], n_layers=size["layers"] // 2,
                     n_heads=size["heads"], hidden_dim=4 * size["hidden"],
                     max_position_embeddings=size["max_len"]).to_json_file(os.path.join(args.out, "student.json"))
    for name in ("train", "heldout"):
        subprocess.run([sys.executable, os.path.join(REPO, "scripts", "binarized_data.py"), "--file_path",
                        os.path.join(args.out, f"{name}.txt"), "--tokenizer_type", "bert", "--tokenizer_name",
                        teacher_dir, "--dump_file", os.path.join(args.out, name)], check=True)
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "token_counts.py"), "--data_file",
                    os.path.join(args.out, "train.teacher.bin"), "--token_counts_dump",
                    os.path.join(args.out, "counts.pickle")], check=True)


if __name__ == "__main__":
    main()
