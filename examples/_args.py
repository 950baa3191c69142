"""Command-line parsing shared by the examples: Meta's flags, accepted the way ``fire`` accepts them.

Meta's scripts are driven by ``fire.Fire(main)``, so their READMEs write ``--ckpt_dir llama-2-7b/``,
``--max_seq_len=512`` or even plain positional values. argparse with both spellings of each flag
(``--max_seq_len`` / ``--max-seq-len``) and optional positionals for the two paths accepts all of those,
without adding ``fire`` as a dependency.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable


def parse_args(description: str, *, max_seq_len: int, max_batch_size: int, max_gen_len: int | None,
               argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("positional", nargs="*", metavar="CKPT_DIR [TOKENIZER_PATH]",
                   help="the checkpoint and tokenizer, as fire would also accept them positionally")

    def flag(name: str, **kwargs) -> None:
        p.add_argument(f"--{name}", *([f"--{name.replace('_', '-')}"] if "_" in name else []), **kwargs)

    flag("ckpt_dir", help="checkpoint: a Meta or HF directory, a .gguf or a llama2.c .bin")
    flag("tokenizer_path", help="tokenizer file (default: the one the checkpoint carries)")
    flag("temperature", type=float, default=0.6)
    flag("top_p", type=float, default=0.9)
    flag("max_seq_len", type=int, default=max_seq_len)
    flag("max_batch_size", type=int, default=max_batch_size)
    flag("max_gen_len", type=int, default=max_gen_len)
    args = p.parse_args(argv)
    if len(args.positional) > 2:
        p.error(f"unexpected arguments: {' '.join(args.positional[2:])}")
    for name, value in zip(("ckpt_dir", "tokenizer_path"), args.positional):
        if getattr(args, name) is not None:
            p.error(f"{name} given twice")
        setattr(args, name, value)
    if args.ckpt_dir is None:
        p.error("--ckpt_dir is required")
    return args


def run(main: Callable[..., Any], *args: Any) -> None:
    """Call the example's ``main``; a llamarun error (a bad path, an impossible setting) ends the script
    with its one-line message and exit code (2 for usage errors, 1 for runtime failures), not a
    traceback."""
    from llamarun.errors import LlamarunError

    try:
        main(*args)
    except LlamarunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
