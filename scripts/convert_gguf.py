#!/usr/bin/env python
"""Turn a GGUF file (a llama.cpp checkpoint, often 4- or 8-bit) into a normal model folder: config.json,
float32 model.safetensors and the tokenizer, which train.py, extract.py and evaluate.py load like any other.

    pip install gguf accelerate        # optional packages, needed by this script only
    python scripts/convert_gguf.py --gguf_file path/to/SmolLM2-135M-Instruct.Q4_1.gguf --dump_folder models/smollm2

transformers reads GGUF files and dequantizes them to float32, but refuses to save the model it loaded
("quantized with gguf and is not serializable") although its weights are plain float32 by then. This script
copies those weights into a model of the same class built from the same config, without the GGUF
quantization entry, checks that every tensor arrived, and saves that. Only causal LMs (what GGUF holds).
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import UserError, fail, first_line, logger  # noqa: E402

OPTIONAL_PACKAGES = ("gguf", "accelerate")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Convert a GGUF checkpoint into a from_pretrained model folder "
                                                 "(config, float32 safetensors, tokenizer).")
    parser.add_argument("--gguf_file", required=True, help="The .gguf file to convert.")
    parser.add_argument("--dump_folder", required=True,
                        help="The model folder to write (must not exist or be empty).")
    return parser.parse_args(argv)


def check_optional_packages():
    """transformers needs both to read a GGUF file; say so in one line rather than in its traceback."""
    import importlib.util

    missing = [name for name in OPTIONAL_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"reading a GGUF file needs the optional package(s) {', '.join(missing)}: "
                        f"pip install {' '.join(OPTIONAL_PACKAGES)}")


def check_paths(args):
    if not os.path.isfile(args.gguf_file):
        hint = ("; a GGUF file that a pip package ships is in site-packages: docs/real-teacher.md prints its path"
                if not os.path.dirname(args.gguf_file) else "")
        raise UserError(f"--gguf_file {args.gguf_file}: no such file{hint}")
    with open(args.gguf_file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"--gguf_file {args.gguf_file}: not a GGUF file (it does not start with the GGUF magic)")
    if os.path.exists(args.dump_folder) and (not os.path.isdir(args.dump_folder) or os.listdir(args.dump_folder)):
        raise UserError(f"--dump_folder {args.dump_folder} exists and is not an empty folder")


def load_gguf(path, stages=None):
    """(model, tokenizer) as transformers loads them from a GGUF file: float32 weights, GGUF-flagged config.
    stages: a progress bar, advanced once the model and once the tokenizer is read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
        if stages is not None:
            stages.update(1)
            stages.set_description_str("Convert: read the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # an unsupported architecture or a damaged file fails in many ways
        raise UserError(f"--gguf_file {path}: cannot load it with transformers ({first_line(exc)})") from None
    return model, tokenizer


def plain_copy(model):
    """The same model as a plain (serializable) one: same class, config without its GGUF entry, same tensors."""
    import torch

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    plain = type(model)(config)
    state = model.state_dict()
    result = plain.load_state_dict(state, strict=False)
    # Tied weights (output projection = embeddings) arrive through their twin.
    loaded = {t.data_ptr() for k, t in plain.state_dict().items() if k in state}
    missing = [k for k in result.missing_keys if plain.state_dict()[k].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise UserError(f"the converted model does not match the GGUF one (missing {missing[:3]}, unexpected "
                        f"{list(result.unexpected_keys)[:3]})")
    for key, tensor in plain.state_dict().items():
        if not torch.equal(tensor, state[key]):
            raise UserError(f"the converted model does not match the GGUF one ({key} differs)")
    return plain.eval()


def convert(gguf_file, dump_folder):
    """Write the folder beside its destination first, so an error never leaves half a model there."""
    import shutil

    from tqdm import tqdm

    # Half a minute for a 135M model on 2 cores: four stages, each named while it runs.
    stages = tqdm(total=4, desc="Convert: read and dequantize the weights", unit="stage",
                  bar_format="{desc} {n}/{total} stages [{elapsed}]")
    model, tokenizer = load_gguf(gguf_file, stages)
    stages.update(1)
    stages.set_description_str("Convert: copy and check every tensor")
    plain = plain_copy(model)
    del model
    stages.update(1)
    stages.set_description_str("Convert: write the folder")
    folder = os.path.abspath(dump_folder)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(folder))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if os.path.isdir(folder):
            os.rmdir(folder)  # empty: check_paths refused anything else
        os.replace(staging, folder)
        stages.update(1)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        stages.close()
    n_params = sum(p.numel() for p in plain.parameters())
    logger.info("Wrote a %d-layer %s (%.1fM parameters, float32) and its tokenizer to %s",
                plain.config.num_hidden_layers, type(plain).__name__, n_params / 1e6, dump_folder)
    return plain, tokenizer


def main(argv=None):
    args = parse_args(argv)
    try:
        check_paths(args)
        check_optional_packages()
        return convert(args.gguf_file, args.dump_folder)
    except UserError as exc:
        fail(str(exc))


if __name__ == "__main__":
    main()
