"""Scores of generated answers against references: exact match, chrF, BLEU and ROUGE-L.

predict scores whole files with them; training's before/after samples use exact match and chrF.
"""

from __future__ import annotations

import math
import re

TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|\w+|[^\w\s]")
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def words(text: str) -> list[str]:
    """Words for Latin scripts, one token per character for CJK, punctuation apart; lower-cased."""
    return TOKEN.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of tokens, harmonic mean of its precision and recall."""
    out, ref = words(output), words(reference)
    if not out or not ref:
        return float(out == ref)
    common = lcs_length(out, ref)
    if not common:
        return 0.0
    precision, recall = common / len(out), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(records: list[dict]) -> dict:
    if not records:
        return {}
    from sacrebleu.metrics import BLEU, CHRF

    outputs = [r["output"].strip() for r in records]
    references = [r["reference"].strip() for r in records]
    chrf = CHRF()
    bleu = BLEU(tokenize="zh" if any(CJK.search(ref) for ref in references) else "13a", effective_order=True)
    per_row = [{"row": r["row"], "chrf": chrf.sentence_score(o, [ref]).score, "rouge_l": rouge_l(o, ref),
                "exact": o == ref, "output": o, "reference": ref} for r, o, ref in zip(records, outputs, references)]
    return {
        "rows": len(records),
        "exact_match": sum(p["exact"] for p in per_row) / len(per_row),
        "chrf": chrf.corpus_score(outputs, [references]).score,
        "bleu": bleu.corpus_score(outputs, [references]).score,
        "rouge_l": sum(p["rouge_l"] for p in per_row) / len(per_row),
        "worst": sorted((p for p in per_row if not p["exact"]), key=lambda p: (p["chrf"], p["rouge_l"]))[:10],
    }


def exact_and_chrf(outputs: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (after stripping) and corpus chrF, for before/after samples."""
    from sacrebleu.metrics import CHRF

    exact = sum(o.strip() == r.strip() for o, r in zip(outputs, references)) / max(len(outputs), 1)
    return {"exact_match": exact, "chrf": CHRF().corpus_score(outputs, [references]).score}


def perplexity(loss: float | None) -> float | None:
    """exp(mean token cross-entropy); None when there is no loss or it would overflow."""
    if loss is None or not math.isfinite(loss) or loss > 700:
        return None
    return round(math.exp(loss), 4)
