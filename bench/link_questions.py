"""`kvwire bench link`'s many-questions workload: one document registered on the edge, prefilled once,
then N questions about it asked in every mode; per answer, each daemon's CPU seconds and the time to
first token.

The document is one SQuAD article's paragraphs in file order, joined by blank lines, as many whole
paragraphs as fit in --qa-tokens tokens (the first article, in file order, whose paragraphs that fit
hold N questions). The questions are taken round-robin over those paragraphs (the first question of
each paragraph, then the second, ...), so they are spread over the document rather than all about
its first paragraph.

CPU seconds are each daemon process's own user + system time (all its threads) from
/proc/<pid>/stat, read just before the request is sent and just after its response arrived
(bench.netlab.daemons.process_cpu_seconds, in bench.link's ask); the edge-cache check (a /metrics
fetch) runs after that second read, so its own cost is not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvwire.bench.data import Example
from kvwire.kvcodec.errors import ConfigError

QA_DOC_ID = "bench-questions"


@dataclass(frozen=True)
class QuestionSet:
    """The document and the questions asked about it."""

    title: str
    text: str
    context_tokens: int
    paragraphs: int
    questions: list[Example]

    def meta(self) -> dict:
        return {
            "title": self.title,
            "context_tokens": self.context_tokens,
            "paragraphs": self.paragraphs,
            "questions": len(self.questions),
        }


def pick_question_set(examples: list[Example], max_tokens: int, count: int, count_tokens: Callable[[str], int]):
    """The first article whose leading paragraphs, joined by blank lines within max_tokens tokens,
    hold `count` questions; the questions taken round-robin over those paragraphs. ConfigError when no
    article does (fewer questions, or a first paragraph over max_tokens)."""
    if count < 1:
        raise ConfigError(f"--questions must be >= 1 for the workload (0 skips it), got {count}")
    articles: dict[str, dict[str, list[Example]]] = {}
    for ex in examples:  # title -> paragraph -> its questions, all in file order
        articles.setdefault(ex.title, {}).setdefault(ex.context.strip(), []).append(ex)
    best = 0
    for title, paragraphs in articles.items():
        kept: list[str] = []
        for para in paragraphs:
            if count_tokens("\n\n".join([*kept, para])) > max_tokens:
                break
            kept.append(para)
        asked = [paragraphs[p] for p in kept]
        held = sum(map(len, asked))
        best = max(best, held)
        if held < count:
            continue
        picked: list[Example] = []
        for i in range(max(map(len, asked))):
            picked += [qs[i] for qs in asked if i < len(qs)]
        text = "\n\n".join(kept)
        return QuestionSet(title, text, count_tokens(text), len(kept), picked[:count])
    raise ConfigError(
        f"no article's paragraphs within {max_tokens} tokens hold {count} questions (at most {best}): "
        f"raise --qa-tokens or lower --questions"
    )


def run_questions(ask, qs: QuestionSet, modes: list[str], progress) -> list[dict]:
    """Ask every question in every mode (modes interleaved per question, so drift in the shared CPUs'
    load spreads over all of them). ask(mode, question) -> a measured sample (bench.link.measure's
    fields with edge_cpu_s and cloud_cpu_s, and cache_hits/cache_misses for a streamed mode). One
    sample per question x mode, with its answer's SQuAD F1 against the gold answers."""
    from kvwire.bench.squad_metrics import best_over_golds, f1_score

    samples = []
    for i, ex in enumerate(qs.questions):
        for mode in modes:
            s = {**ask(mode, ex.question), "mode": mode, "question": i, "question_id": ex.id}
            if "error" not in s:
                s["f1"] = best_over_golds(f1_score, s["answer"], list(ex.answers))
            samples.append(s)
            progress(
                f"question {i + 1}/{len(qs.questions)} {mode}: "
                + (
                    s["error"]
                    if "error" in s
                    else f"TTFT {s['ttft_s']:.2f} s, CPU edge {s['edge_cpu_s']:.2f} s cloud {s['cloud_cpu_s']:.2f} s"
                )
            )
    return samples
