"""The probe's metrics and logistic regression against scikit-learn, an independent reference.

``gram_jax.training.evaluate`` implements balanced accuracy, ROC-AUC and an L-BFGS
multinomial logistic regression itself (no scikit-learn at run time); here each is compared
with scikit-learn's on small problems, ties and class imbalance included.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from gram_jax.training import evaluate


@pytest.mark.parametrize("seed", [0, 1])
def test_balanced_accuracy_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.choice(4, size=200, p=[0.6, 0.25, 0.1, 0.05])  # imbalanced
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 4, 200))
    ours = evaluate.balanced_accuracy(y_true, y_pred)
    assert ours == pytest.approx(100 * balanced_accuracy_score(y_true, y_pred), abs=1e-9)


def test_roc_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(2)
    y = rng.random(300) < 0.1  # about 10 % positives, as the synergy task
    score = np.round(rng.standard_normal(300) + 1.5 * y, 1)  # rounding makes many ties
    assert evaluate.roc_auc(y, score) == pytest.approx(100 * roc_auc_score(y, score), abs=1e-9)


def test_logistic_regression_matches_sklearn():
    rng = np.random.default_rng(3)
    n, d, k, l2 = 240, 4, 3, 1e-2
    x = rng.standard_normal((n, d))
    y = np.argmax(x @ rng.standard_normal((d, k)) + 0.5 * rng.standard_normal((n, k)), axis=1)
    p = evaluate._fit_logreg(jnp.asarray(x, jnp.float32), jnp.asarray(y), l2, k)
    ours = np.asarray(jax.nn.softmax(jnp.asarray(x, jnp.float32) @ p["w"] + p["b"]))
    # scikit-learn minimises 0.5 ||W||^2 + C sum CE, i.e. mean CE + ||W||^2 / (2 C n).
    ref = LogisticRegression(C=1 / (2 * l2 * n), tol=1e-10, max_iter=1000).fit(x, y)
    np.testing.assert_allclose(ours, ref.predict_proba(x), atol=1e-5)
