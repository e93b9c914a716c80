"""The options of `kvwire eval` and `kvwire diagnose`.

They live apart from bench/eval.py and bench/diagnose.py, whose evaluator imports torch and
transformers, so `kvwire eval --help` loads neither (bench/main.py imports this module alone).
"""

from __future__ import annotations

from kvwire.bench.data import SQUAD_DEV


def add_model_arguments(p) -> None:
    """The model and data options eval and diagnose share."""
    p.add_argument("--model", default=None, help="model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="fp32", help="model dtype: fp32, fp16 or bf16 (default fp32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default: torch's choice; 1 is faster on a CPU shared with other work)",
    )
    p.add_argument(
        "--data", default=SQUAD_DEV, help="squad-dev (after `kvwire data fetch`), squad-sample, or a .json/.jsonl path"
    )


def add_eval_arguments(p) -> None:
    """The options of `kvwire eval` (bench/eval.py)."""
    add_model_arguments(p)
    p.add_argument("--limit", type=int, default=100, help="questions to use (default 100; 0 = all)")
    p.add_argument(
        "--engine",
        default="hf",
        choices=["hf", "vllm"],
        help="the cloud engine that answers (default hf; vllm: a vLLM worker in .venv-vllm, docs/vllm.md; "
        "its kv answers get no teacher-forced scores, those are the hf cache's)",
    )
    p.add_argument("--vllm-dtype", default="fp32", help="engine vllm: vLLM's dtype (default fp32, the edge's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the question shuffle and the needle filler (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="take questions in file order instead of a seeded shuffle")
    p.add_argument(
        "--selectors",
        default="all",
        help="comma list of selector names, or all (default: every registered selector; docs/codec.md lists them)",
    )
    p.add_argument(
        "--retentions", default="0.25,0.5,1.0", help="comma list in (0, 1]; 1.0 = no selection (default 0.25,0.5,1.0)"
    )
    p.add_argument(
        "--profiles",
        default="mixed-int4",
        help="comma list of profile names or profile JSON files (default mixed-int4)",
    )
    p.add_argument(
        "--scout",
        default="",
        metavar="PREFILLS",
        help="also send each grid selection in scout mode with these cloud prefills: sparse, full or sparse,full",
    )
    p.add_argument(
        "--fixed",
        default="stream/stream",
        metavar="T/Q,...",
        help="where the template prefix (T) and the question + template suffix (Q) KV come from, each stream "
        "(the edge sends it) or cloud (the cloud computes it); a comma list sweeps them, e.g. "
        "stream/stream,cloud/stream,cloud/cloud (default stream/stream)",
    )
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="SELECTOR:RETENTION:PROFILE",
        help="an extra setting outside the grid, e.g. q2c:0.5:mixed-int4 or none:1:int4, optionally with fixed "
        "positions as in --fixed: none:1:int8:cloud/cloud (repeatable, or comma list)",
    )
    p.add_argument(
        "--needle",
        default="",
        metavar="LENGTHS",
        help="turn each question into needles in haystacks of these context lengths, e.g. 512,1024,2048",
    )
    p.add_argument("--needle-depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths, cycled over questions")
    p.add_argument(
        "--max-new-tokens", type=int, default=24, help="answer length cap (default 24; SQuAD answers are short)"
    )
    p.add_argument("--out", required=True, help="output folder; rerunning with the same folder resumes")
    p.add_argument(
        "--shard",
        default="",
        metavar="K/N",
        help="compute only questions i with i %% N == K (run N processes on one --out, then once without)",
    )
    p.add_argument(
        "--measure",
        default="answers",
        choices=("answers", "tf"),
        help="answers (default): generate every setting's answer and score kv settings teacher-forced too; tf: "
        "generate only the full-KV answer and score kv settings teacher-forced (one forward pass each instead of "
        "a generation: for wide grids; no F1 columns for them)",
    )
    p.add_argument("--title", default="", help="title of the report and plot (default: model and data)")
    p.add_argument(
        "--quality-table",
        default="",
        metavar="PATH",
        help="also write mode auto's quality table (cloud-agent --quality-table, docs/auto.md) from a complete run",
    )
    p.add_argument(
        "--quality-measure",
        default="tf_top1",
        choices=("tf_top1", "agreement_f1"),
        help="the quality table's scale: teacher-forced top-1 agreement with the full cache (default; kv rows only) "
        "or agreement F1 with the full answer (every row)",
    )


def add_diagnose_arguments(p) -> None:
    """The options of `kvwire diagnose` (bench/diagnose.py)."""
    add_model_arguments(p)
    p.add_argument("--limit", type=int, default=30, help="questions to use (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the question shuffle (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="take questions in file order")
    p.add_argument("--max-new-tokens", type=int, default=24, help="answer length cap (default 24)")
    p.add_argument("--low", default="int4", help="the low precision under test (default int4; int3 also works)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="agreement-F1 loss that counts as damage (default 0.05: two answers in 40 changing completely)",
    )
    p.add_argument(
        "--max-protected",
        type=int,
        default=3,
        help="at most this many layers kept at FP16 before the damage counts as distributed (default 3)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="instead of the INT4 sweep: allocate an encoding per layer and per K/V from a teacher-forced "
        "sensitivity sweep so the profile's bytes are at most FRACTION of the FP16 bytes (e.g. 0.15), and write it",
    )
    p.add_argument(
        "--retention",
        type=float,
        default=1.0,
        help="with --budget: the retention the profile will be used at; the budget covers the positions it keeps "
        "(template and question included unless --fixed leaves them to the cloud). Default 1.0",
    )
    p.add_argument(
        "--fixed",
        default="stream/stream",
        metavar="T/Q",
        help="with --budget: where the template prefix (T) and the question + template suffix (Q) KV will come "
        "from, each stream or cloud (eval's --fixed); the budget covers only what is streamed. Default stream/stream",
    )
    p.add_argument(
        "--encodings",
        default="",
        help="with --budget: comma list of the encodings to choose from (default: every registered encoding "
        "that takes the token axis and costs no more than fp16)",
    )
    p.add_argument(
        "--name", default="", help="name of the written profile (default: <model>-diagnosed, or <model>-budget-B)"
    )
    p.add_argument("--out", required=True, help="output folder: profile.json, diagnose.json, diagnose.md (resumable)")
