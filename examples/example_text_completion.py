"""Text completion with llamarun, as in Meta's Llama 2 ``example_text_completion.py``.

    python examples/example_text_completion.py --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model
    torchrun --nproc_per_node 1 examples/example_text_completion.py --ckpt_dir llama-2-7b/ \
        --tokenizer_path tokenizer.model --max_seq_len 128 --max_batch_size 4

``--ckpt_dir`` takes any checkpoint llamarun reads (Meta or HF directory, .gguf, llama2.c .bin); Meta's
multi-shard checkpoints are merged on load, so one process (and no NCCL) runs every model size.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _args, however the script is launched

from _args import parse_args, run  # noqa: E402

from llamarun import Llama  # noqa: E402


def main(ckpt_dir: str, tokenizer_path: str | None = None, temperature: float = 0.6, top_p: float = 0.9,
         max_seq_len: int = 128, max_gen_len: int = 64, max_batch_size: int = 4) -> None:
    """Complete a few prompts: natural continuations and a few-shot translation."""
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        seed=1,
    )

    prompts: list[str] = [
        # For these prompts, the expected answer is the natural continuation of the prompt.
        "I believe the meaning of life is",
        "Simply put, the theory of relativity states that ",
        """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
        # Few-shot prompt (a few examples before asking the model to complete the next one).
        """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
    ]
    results = generator.text_completion(
        prompts,
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
    )
    for prompt, result in zip(prompts, results):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")


if __name__ == "__main__":
    a = parse_args(__doc__.splitlines()[0], max_seq_len=128, max_batch_size=4, max_gen_len=64)
    run(main, a.ckpt_dir, a.tokenizer_path, a.temperature, a.top_p, a.max_seq_len, a.max_gen_len, a.max_batch_size)
