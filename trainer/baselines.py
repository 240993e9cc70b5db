"""The cheapest answers to a label task, scored beside the adapter: does it need an LLM at all?

* ``majority``: every answer is the train split's most frequent label. On skewed labels its
  accuracy (exact match) is high and its macro F1 low, which is why label tasks gate on macro F1.
* ``classical``: TF-IDF word and bigram features of the prompt and a logistic regression
  (scikit-learn), trained on the same train split; classes weighted by their inverse frequency so
  that a skewed task does not collapse onto its majority label. Seconds on a CPU.

Both answer the same test examples as the adapter and are scored with the same metrics; the
registry stores them as baselines (subjects ``majority`` and ``classical``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .dataset import Example


@dataclass(frozen=True)
class BaselineAnswers:
    subject: str
    predictions: list[str]
    seconds_per_answer: float  # predicting only, measured here


def majority_label(train: Sequence[Example], test: Sequence[Example]) -> BaselineAnswers:
    label = Counter(e.completion.strip() for e in train).most_common(1)[0][0]
    return BaselineAnswers("majority", [label] * len(test), 0.0)


def classical_classifier(train: Sequence[Example], test: Sequence[Example], seed: int = 0) -> BaselineAnswers:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                          LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed))
    model.fit([e.user_text for e in train], [e.completion.strip() for e in train])
    started = time.perf_counter()
    predictions = [str(p) for p in model.predict([e.user_text for e in test])]
    return BaselineAnswers("classical", predictions, (time.perf_counter() - started) / max(len(test), 1))
