"""Scores of predictions against references: the metrics ``loragate eval`` records.

Every metric is a share in [0, 1], higher is better. Answers are compared after
``normalize`` (case, surrounding punctuation and whitespace), the usual exact-match rule.
"""

from __future__ import annotations

from collections.abc import Sequence

from loragate.text import is_json, normalize, token_overlap_f1

from .json_fields import field_scores, schema_valid


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    return _mean([normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)])


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """SQuAD's token-overlap F1, averaged over examples."""
    return _mean([token_overlap_f1(p, r) for p, r in zip(predictions, references, strict=True)])


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """ROUGE-L F-measure (Google's rouge-score, with stemming), averaged over examples."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)])


def json_valid(predictions: Sequence[str]) -> float:
    """Share of predictions that parse as JSON."""
    return _mean([is_json(p) for p in predictions])


def classification(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-averaged precision, recall and F1 over ``labels``; an answer that
    is no label counts as wrong for every class."""
    predicted = [normalize(p) for p in predictions]
    expected = [normalize(r) for r in references]
    per_class = []
    for label in (normalize(x) for x in labels):
        true_positive = sum(p == label == e for p, e in zip(predicted, expected, strict=True))
        predicted_count = sum(p == label for p in predicted)
        expected_count = sum(e == label for e in expected)
        precision = true_positive / predicted_count if predicted_count else 0.0
        recall = true_positive / expected_count if expected_count else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append((precision, recall, f1))
    return {
        "accuracy": exact_match(predictions, references),
        "macro_precision": _mean([c[0] for c in per_class]),
        "macro_recall": _mean([c[1] for c in per_class]),
        "macro_f1": _mean([c[2] for c in per_class]),
    }


def looks_like_json(references: Sequence[str]) -> bool:
    return bool(references) and json_valid(references) == 1.0 and all(r.strip()[:1] in "{[" for r in references)


def score_all(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None = None,
              schema: dict | None = None) -> dict[str, float]:
    """The metrics that suit the task: exact match always; class metrics for labels; token F1
    and ROUGE-L for free text; JSON validity, record match and field precision/recall/F1 when
    the references are JSON (``json_fields``), and schema validity when the data declares one."""
    scores = {"exact_match": exact_match(predictions, references)}
    if labels:
        scores |= classification(predictions, references, labels)
    else:
        scores |= {"token_f1": token_f1(predictions, references), "rouge_l": rouge_l(predictions, references)}
    if looks_like_json(references):
        scores["json_valid"] = json_valid(predictions)
        scores |= field_scores(predictions, references)
    if schema is not None:
        scores["schema_valid"] = schema_valid(predictions, schema)
    return {name: round(value, 6) for name, value in scores.items()}


def score_metric(predictions: Sequence[str], references: Sequence[str], metric: str,
                 labels: Sequence[str] | None = None, schema: dict | None = None) -> float:
    """One named metric, e.g. the gate's primary metric."""
    scores = score_all(predictions, references, labels, schema)
    if metric not in scores:
        from loragate.registry import InvalidInput

        raise InvalidInput(f"metric {metric!r} does not apply here; available: {', '.join(scores)}")
    return scores[metric]


def _mean(values: Sequence[float | bool]) -> float:
    return sum(values) / len(values) if values else 0.0
