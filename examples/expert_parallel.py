"""Expert parallelism with moepass: the bundled model's experts split over the ranks, only kept slots exchanged.

    torchrun --nproc-per-node 2 examples/expert_parallel.py --policy top_p --p 0.5

Each rank loads the bundled model with transformers' distributed runtime and
moepass as its expert-parallel implementation, compiles it with the
``adaptive_moe`` backend, runs it, checks its logits against the same model
compiled on one process with the same policy, and prints one JSON line: its
tokens, the rows and bytes it sent to other ranks' experts, the check's error.

``--layout`` picks how the ranks hold the model:

* ``shared`` (default): ``DistributedConfig(tp_size=N, tp_plan={}, ep_size=N)``,
  expert parallelism alone — the ranks share one batch, each sends its slice of
  the tokens to the experts' owners; the model compiles to one graph;
* ``fsdp``: ``DistributedConfig(fsdp_size=N, ep_size=N)`` — a batch per rank,
  dense weights FSDP-sharded (FSDP's hooks, which torch never traces, split
  each block into a router graph and an experts graph; only kept slots are
  still exchanged);
* ``mesh``: the plain model on every rank and
  ``options={"expert_parallel": {"mesh": mesh}}`` — a batch per rank, rank r
  runs experts r·E/N … (r+1)·E/N − 1.

CPU (gloo) by default; ``--device cuda`` runs NCCL with the Triton lowering
(written, not yet run on a multi-GPU machine).  Across machines, add
``--nnodes``/``--node-rank``/``--master-addr`` to torchrun as usual.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

import moepass  # registers DistributedConfig(ep_implementation="moepass") with transformers
from moepass import bundled
from moepass.runtime.expert_parallel import count_traffic

PROMPTS = ("def fibonacci(n):\n    ", "import os\nimport sys\n\n", "class Stack:\n    def push(", "for line in open(")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", choices=("shared", "fsdp", "mesh"), default="shared")
    parser.add_argument("--policy", default="top_p", help="static | top_p | threshold")
    parser.add_argument("--p", type=float, default=0.5, help="top_p's mass")
    parser.add_argument("--T", type=float, default=0.1, help="threshold's gap")
    parser.add_argument("--inner", default="inductor", help="the inner compiler: inductor | aot_eager | eager")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--timeout", type=float, default=120, help="seconds a collective may wait before failing")
    return parser.parse_args()


def _options(args) -> dict:
    options = {"inner": args.inner, "policy": args.policy}
    if args.policy == "top_p":
        options["p"] = args.p
    elif args.policy == "threshold":
        options["T"] = args.T
    return options


def _load(args, world: int, device: torch.device):
    """The model as ``--layout`` distributes it, and the backend options that go with it."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    options = _options(args)
    if args.layout == "mesh":
        from torch.distributed.device_mesh import init_device_mesh

        options["expert_parallel"] = {"mesh": init_device_mesh(device.type, (world,))}
        return bundled.load_model().to(device), options
    if args.layout == "shared":
        config = DistributedConfig(tp_size=world, tp_plan={}, ep_size=world, ep_implementation="moepass")
    else:
        config = DistributedConfig(fsdp_size=world, ep_size=world, ep_implementation="moepass")
    model = AutoModelForCausalLM.from_pretrained(bundled.BUNDLED_DIR, distributed_config=config, dtype=torch.float32)
    return model.eval(), options


def main() -> None:
    args = _arguments()
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # a short timeout: a rank that waits on one that is not coming fails instead of hanging (transformers' own is 2 h)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    model, options = _load(args, world, device)
    shared = args.layout == "shared"
    prompt = PROMPTS[0 if shared else rank % len(PROMPTS)]  # ranks sharing a batch must feed the same tokens
    input_ids = bundled.encode(prompt).unsqueeze(0).to(device)

    fast = torch.compile(model, backend="adaptive_moe", options=options)
    with torch.no_grad(), count_traffic() as traffic:
        logits = fast(input_ids).logits
    # the same model and policy on this process alone
    alone = torch.compile(bundled.load_model().to(device), backend="adaptive_moe", options=_options(args))
    with torch.no_grad():
        expected = alone(input_ids).logits
    error = float((logits - expected).abs().max() / expected.abs().max())

    model.forward = torch.compile(model.forward, backend="adaptive_moe", options=options)
    generated = model.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    line = json.dumps({
        "rank": rank, "world": world, "layout": args.layout, "policy": args.policy, "tokens": input_ids.numel(),
        "rows_sent": traffic.rows_sent, "rows_local": traffic.rows_local, "bytes_sent": traffic.bytes,
        "error_vs_one_process": error,
        "expert_parallel_blocks": str(moepass.report(fast)).count("expert parallel over"),
        "text": bundled.decode(generated[0].cpu()),
    })
    # one write of the whole line: the ranks share one stdout, and print's separate writes of the text and
    # its newline could interleave with another rank's line
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
