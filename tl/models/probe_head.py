"""Start fine-tuning from the best linear probe (LP-FT, Kumar et al. 2022), fitted in closed form.

A randomly initialised head makes the first fine-tuning steps push large, noisy gradients into the pretrained
features while the head is still wrong ("feature distortion"); starting from a head that already reads the frozen
features well lets fine-tuning refine them instead. tl's staged strategy `lp_ft` gets there by training the head
alone for some epochs; `finetune.head_init=probe` gets there before the first step: it extracts the frozen
backbone's pooled features of the (unaugmented) training split once (`tl.data.features`, cached like the linear
probe's), fits a standardised multinomial logistic regression whose regularisation C is chosen by stratified
cross-validation on the training split, and writes it into the classifier, the standardisation folded into the
weights (w / sigma, b - w . mu / sigma): the model's logits are then exactly the probe's. Validation and test data
are never looked at. The fit and its cross-validated accuracy go to results.json (`head_init`).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.preprocessing import StandardScaler
from torch import nn

from tl.data.features import FeatureCache
from tl.models.backbone import classifier_names

log = logging.getLogger(__name__)


def fit_probe(x: np.ndarray, y: np.ndarray, seed: int, n_classes: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(weight (C, F), bias (C,), evidence): a standardised logistic regression, C by inner cross-validation, its
    standardisation folded into the weights so that `x @ weight.T + bias` are its decision values."""
    counts = np.bincount(y, minlength=n_classes)
    folds = int(min(5, counts[counts > 0].min()))
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    if folds >= 2:
        clf = LogisticRegressionCV(Cs=10, cv=folds, max_iter=2000, random_state=seed, n_jobs=1).fit(z, y)
        c, cv_acc = float(clf.C_[0]), float(clf.scores_[next(iter(clf.scores_))].mean(axis=0).max())
    else:  # one example of some class: no folds to choose C with; sklearn's default
        from sklearn.linear_model import LogisticRegression

        clf, c, cv_acc = LogisticRegression(max_iter=2000).fit(z, y), 1.0, float("nan")
    coef = np.zeros((n_classes, x.shape[1]))
    intercept = np.full(n_classes, -30.0)  # a class absent from train: never predicted by the start head
    present = clf.classes_
    if len(present) == 2 and coef.shape[0] >= 2:  # sklearn's binary form: one row for the positive class
        coef[present[1]], intercept[present[1]] = clf.coef_[0] / 2, clf.intercept_[0] / 2
        coef[present[0]], intercept[present[0]] = -clf.coef_[0] / 2, -clf.intercept_[0] / 2
    else:
        coef[present], intercept[present] = clf.coef_, clf.intercept_
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    weight = coef / scale
    bias = intercept - weight @ scaler.mean_
    return weight, bias, {"C": c, "cv_acc": round(cv_acc, 4), "folds": folds}


def init_head_from_probe(module: nn.Module, datamodule, cache_dir: str, seed: int) -> dict:
    """Fit the probe on the training split's frozen features and write it into `module`'s classifier; returns what
    it did (for results.json)."""
    started = time.perf_counter()
    model = module.model
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"finetune.head_init=probe needs a linear classifier, {type(head).__name__} found")
    feats, targets = FeatureCache(cache_dir).get(model, classifier_names(model), datamodule, ("train",))["train"]
    weight, bias, evidence = fit_probe(feats.double().numpy(), targets.numpy(), seed, head.out_features)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
    evidence["seconds"] = round(time.perf_counter() - started, 2)
    log.info("Head initialised from a linear probe: C=%.3g, cross-validated accuracy %.3f (%.1fs)", evidence["C"],
             evidence["cv_acc"], evidence["seconds"])
    return evidence
