"""The Matthews correlation coefficients that crates/kindling-recipes/src/finetune/tests.rs
checks `matthews_corrcoef` against, from scikit-learn (in the CI venv through
sentence-transformers): each confusion matrix (rows true, columns predicted) is expanded to label
lists and scored with sklearn.metrics.matthews_corrcoef.

    python tests/reference/sklearn_mcc.py
"""
from sklearn.metrics import matthews_corrcoef

MATRICES = {
    "binary": [[3, 1], [0, 2]],
    "three classes": [[5, 1, 0], [2, 3, 1], [0, 2, 4]],
    "one class predicted": [[4, 0], [3, 0]],
}
for name, cm in MATRICES.items():
    y_true, y_pred = [], []
    for t, row in enumerate(cm):
        for p, n in enumerate(row):
            y_true += [t] * n
            y_pred += [p] * n
    print(f"{name}: {matthews_corrcoef(y_true, y_pred)!r}")
