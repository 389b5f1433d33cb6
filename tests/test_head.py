"""The head refit (last-layer retraining on counterfactual views) and its L1 logistic solver."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import tiny_images, tiny_model
from relevance_finetune.head import (DFR_C, HeadRefit, _fold_into_head, fit_l1_logistic, l1_logistic_objective,
                                     linear_classifier, pre_logits, refit_head, refit_head_groups)


def _problem(seed: int = 0, n: int = 150, width: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes from two informative features among ``width``, with label noise."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, width, generator=generator, dtype=torch.float64)
    noise = 0.7 * torch.randn(n, generator=generator, dtype=torch.float64)
    labels = (features[:, 0] + noise > 0).long() + (features[:, 1] + noise > 0.5).long()
    return features, labels


def _sklearn_l1_logistic(**kwargs):
    """scikit-learn's L1 ``LogisticRegression(**kwargs)``, named as its version wants (``l1_ratio`` from 1.8)."""
    sklearn = pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    l1 = dict(l1_ratio=1.0) if tuple(map(int, sklearn.__version__.split(".")[:2])) >= (1, 8) else dict(penalty="l1")
    return LogisticRegression(**l1, **kwargs)


def _sklearn_l1(features: torch.Tensor, labels: torch.Tensor, C: float) -> tuple[torch.Tensor, torch.Tensor]:
    fitted = _sklearn_l1_logistic(solver="saga", C=C, max_iter=200_000, tol=1e-12).fit(features, labels)
    return torch.from_numpy(fitted.coef_), torch.from_numpy(fitted.intercept_)


@pytest.mark.parametrize("C", [1.0, 0.1, 0.03])
def test_solver_matches_scikit_learn(C):
    features, labels = _problem()
    coef, intercept = fit_l1_logistic(features, labels, C, 3, tol=1e-10, max_iter=100_000)
    reference, reference_intercept = _sklearn_l1(features.numpy(), labels.numpy(), C)
    ours, theirs = (l1_logistic_objective(features, labels, w, b, C) for w, b in ((coef, intercept),
                                                                                  (reference, reference_intercept)))
    assert abs(ours - theirs) <= 1e-4 * abs(theirs)
    assert torch.allclose(coef, reference, atol=1e-4)
    # softmax ignores a common shift of the intercepts: compare them centred
    assert torch.allclose(intercept - intercept.mean(), reference_intercept - reference_intercept.mean(), atol=1e-4)
    if C <= 0.1:  # the L1 penalty zeroes the uninformative features, as scikit-learn's does
        assert torch.equal(coef == 0, reference == 0) and (coef == 0).any()


@pytest.mark.parametrize("C", [1.0, 0.1])
def test_two_classes_are_liblinears_problem_but_for_the_intercept_penalty(C):
    """docs/method.md: for two classes the multinomial fit is DFR's binary liblinear fit, except that
    liblinear shrinks the intercept (a constant feature's weight); a large ``intercept_scaling``
    makes that penalty vanish and the two fits agree."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(150, 6, generator=generator, dtype=torch.float64)
    noise = 0.7 * torch.randn(150, generator=generator, dtype=torch.float64)
    labels = (features[:, 0] + 0.5 * features[:, 1] + noise > 0.8).long()  # imbalanced: a large intercept
    coef, intercept = fit_l1_logistic(features, labels, C, 2, tol=1e-12, max_iter=200_000)
    difference, offset = coef[1] - coef[0], float(intercept[1] - intercept[0])
    fits = {}
    for scaling in (1.0, 100.0):
        fitted = _sklearn_l1_logistic(solver="liblinear", C=C, tol=1e-12, max_iter=100_000,
                                      intercept_scaling=scaling).fit(features.numpy(), labels.numpy())
        fits[scaling] = torch.from_numpy(fitted.coef_[0]), float(fitted.intercept_[0])
    assert torch.allclose(fits[100.0][0], difference, atol=1e-2) and abs(fits[100.0][1] - offset) < 1e-2
    assert abs(fits[1.0][1]) < abs(offset) - 0.1  # the penalised intercept is shrunk


def test_a_warm_start_reaches_the_same_optimum():
    """Started near a solution (as the C path and the averaged fits are), the solver still descends
    to this C's optimum, the penalty counted from the first step: the objective equals a cold start's."""
    features, labels = _problem(seed=2)
    for C in (1.0, 0.1):
        cold = fit_l1_logistic(features, labels, C, 3, tol=1e-10, max_iter=100_000)
        start = (0.8 * cold[0], 0.8 * cold[1])
        warm = fit_l1_logistic(features, labels, C, 3, tol=1e-10, max_iter=100_000, init=start)
        cold_value, warm_value, start_value = (l1_logistic_objective(features, labels, *fit, C)
                                               for fit in (cold, warm, start))
        assert warm_value < start_value  # it moved off the start
        assert abs(warm_value - cold_value) <= 1e-8 * abs(cold_value)


def test_solver_is_deterministic_and_warns_when_it_stops_early():
    features, labels = _problem(seed=1)
    first, second = fit_l1_logistic(features, labels, 0.3), fit_l1_logistic(features, labels, 0.3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.warns(UserWarning, match="no convergence in 3 iterations"):
        fit_l1_logistic(features, labels, 0.3, tol=0.0, max_iter=3)


def test_the_fold_is_exact():
    """The model's logits after the fold are the standardised-feature linear model's."""
    model = tiny_model(num_classes=5)
    images = tiny_images(model, batch=6)
    generator = torch.Generator().manual_seed(0)
    coef, intercept = torch.randn(5, 32, generator=generator, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    mean, std = torch.randn(32, dtype=torch.float64), torch.rand(32, dtype=torch.float64) + 0.5
    with torch.no_grad():
        features = pre_logits(model, images).double()
        _fold_into_head(model.get_classifier(), coef, intercept, mean, std)
        logits = model(images).double()
    assert torch.allclose(logits, (features - mean) / std @ coef.T + intercept, atol=1e-4)


def _masked(model: nn.Module, per_class: int, num_classes: int, seed: int = 0):
    count = per_class * num_classes
    images = tiny_images(model, batch=count, seed=seed)
    side = images.shape[-1]
    masks = torch.zeros(count, side, side)
    masks[:, side // 4: 3 * side // 4, side // 4: 3 * side // 4] = 1
    return images, masks, torch.arange(count) % num_classes


@pytest.mark.parametrize("key", ["vit_cls", "vit_reg_avg"])
def test_refit_changes_only_the_head_for_token_and_avg_pooling(key):
    model = tiny_model(key, num_classes=3).train()
    before = copy.deepcopy(model.state_dict())
    images, masks, labels = _masked(model, per_class=4, num_classes=3)
    refit = refit_head(model, images, masks, labels, views=2, C=(1.0, 0.1), fits=3, progress=False)
    assert isinstance(refit, HeadRefit) and refit.C in (1.0, 0.1) and set(refit.scores) == {1.0, 0.1}
    assert refit.features == 32 and refit.rows == 12 * 3 and refit.seconds > 0
    assert all(0 <= worst <= mean <= 1 for worst, mean in refit.scores.values())
    assert model.training  # the mode is restored
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"head.weight", "head.bias"}
    again = tiny_model(key, num_classes=3)  # the same seed: the same head
    refit_head(again, images, masks, labels, views=2, C=(1.0, 0.1), fits=3, progress=False)
    assert torch.equal(again.head.weight, model.head.weight)


def test_validation_scores_the_candidates_and_one_c_skips_the_choice():
    model = tiny_model(num_classes=2)
    images, masks, labels = _masked(model, per_class=3, num_classes=2)
    validation = _masked(model, per_class=2, num_classes=2, seed=5)
    refit = refit_head(model, images, masks, labels, views=1, C=(0.7, 0.07), fits=1, validation=validation,
                       progress=False)
    assert set(refit.scores) == {0.7, 0.07} and refit.rows == 12  # every image fits: none held out
    assert refit_head(model, images[:2], masks[:2], labels[:2], C=(0.3,), fits=1, progress=False).scores == {}
    head = model.head.weight.clone()
    with pytest.raises(ValueError, match=r"class\(es\) \[1\]"):  # refused before any work: the head stays
        refit_head(model, images, masks, labels, validation=tuple(t[::2] for t in validation), progress=False)
    assert torch.equal(model.head.weight, head)


class PooledChannels(nn.Module):
    """A timm-like model whose pre-logits are the mean of each channel: channel 0 carries the
    object, channel 1 the background, and the head reads the background only (a shortcut)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0, -8.0], [0.0, 8.0]]))
            self.head.bias.zero_()

    def forward_features(self, x):
        return x

    def forward_head(self, x, pre_logits=False):
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _shortcut_images(count: int, agreement: float, seed: int):
    """Class +-1 in channel 0 inside a centred square, a shortcut +-1 in channel 1 outside it that
    agrees with the class with probability ``agreement``."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    agrees = torch.rand(count, generator=generator) < agreement
    shortcut = torch.where(agrees, labels, 1 - labels)
    masks = torch.zeros(count, 8, 8)
    masks[:, 2:6, 2:6] = 1
    images = 0.3 * torch.randn(count, 2, 8, 8, generator=generator)
    images[:, 0] += (2.0 * labels - 1).view(-1, 1, 1) * masks
    images[:, 1] += (2.0 * shortcut - 1).view(-1, 1, 1) * (1 - masks)
    return images, masks, labels


def test_refit_moves_the_head_from_the_shortcut_to_the_object():
    model = PooledChannels()
    ood_images, _, ood_labels = _shortcut_images(400, agreement=0.5, seed=1)
    accuracy = lambda: (model(ood_images).argmax(1) == ood_labels).float().mean().item()  # noqa: E731
    before = accuracy()
    refit_head(model, *_shortcut_images(40, agreement=0.9, seed=0), fits=5, progress=False)
    assert before < 0.65 and accuracy() > 0.95
    assert model.head.weight[:, 0].abs().sum() > model.head.weight[:, 1].abs().sum()


def test_the_views_do_not_depend_on_the_batch_size():
    images, masks, labels = _shortcut_images(24, agreement=0.9, seed=0)
    heads = []
    for batch_size in (3, 8, 64):
        model = PooledChannels()
        refit_head(model, images, masks, labels, views=2, fits=2, batch_size=batch_size, progress=False)
        heads.append(torch.cat([model.head.weight, model.head.bias[:, None]], 1))
    assert all(torch.equal(head, heads[0]) for head in heads[1:])


def test_validation_groups_score_the_candidates_by_worst_group_on_the_validation_images():
    images, masks, labels = _shortcut_images(24, agreement=0.9, seed=0)
    validation = _shortcut_images(12, agreement=0.5, seed=1)
    one_group = refit_head(PooledChannels(), images, masks, labels, views=1, fits=1, validation=validation,
                           validation_groups=torch.zeros(12, dtype=torch.long), progress=False)
    assert all(worst == mean for worst, mean in one_group.scores.values())  # one group: its accuracy is the mean
    singletons = refit_head(PooledChannels(), images, masks, labels, views=1, fits=1, validation=validation,
                            validation_groups=torch.arange(12), progress=False)
    assert all(worst == float(mean == 1.0) for worst, mean in singletons.scores.values())
    with pytest.raises(ValueError, match="validation_groups must give the group of each validation image"):
        refit_head(PooledChannels(), images, masks, labels, validation=validation,
                   validation_groups=torch.arange(5), progress=False)
    with pytest.raises(ValueError, match="validation_groups must give"):
        refit_head(PooledChannels(), images, masks, labels, validation_groups=torch.arange(12), progress=False)


def _grouped_images(per_group: tuple[int, int, int, int], seed: int):
    """Waterbirds in miniature for ``PooledChannels``: class y (+-1 in channel 0) and place (+-1 in
    channel 1, the shortcut its head reads), group ``2 * y + place``, ``per_group[g]`` images of group g."""
    generator = torch.Generator().manual_seed(seed)
    groups = torch.cat([torch.full((count,), group) for group, count in enumerate(per_group)])
    labels, place = groups // 2, groups % 2
    images = 0.3 * torch.randn(len(groups), 2, 8, 8, generator=generator)
    images[:, 0] += (2.0 * labels - 1).view(-1, 1, 1)
    images[:, 1] += (2.0 * place - 1).view(-1, 1, 1)
    return images, labels, groups


def _worst_group_accuracy(model: nn.Module, images, labels, groups) -> float:
    correct = model(images).argmax(1) == labels
    return min(correct[groups == group].float().mean().item() for group in groups.unique().tolist())


def test_the_group_refit_raises_the_worst_group_accuracy():
    """DFR's protocol on held-out images whose minority groups are rare (as Waterbirds' validation
    is not, but its training split is): the refit head reads the class, not the place."""
    model = PooledChannels()
    test = _grouped_images((100, 100, 100, 100), seed=1)
    before = _worst_group_accuracy(model, *test)
    refit = refit_head_groups(model, *_grouped_images((40, 4, 4, 40), seed=0), fits=5, progress=False)
    assert before < 0.05 and _worst_group_accuracy(model, *test) > 0.95
    assert model.head.weight[:, 0].abs().sum() > model.head.weight[:, 1].abs().sum()
    assert set(refit.scores) == set(DFR_C) and refit.C in DFR_C and refit.rows == 88 and refit.features == 2
    assert all(0 <= worst <= mean <= 1 for worst, mean in refit.scores.values())


def test_the_group_refit_is_deterministic_and_changes_only_the_head():
    model = tiny_model(num_classes=2).train()
    before = copy.deepcopy(model.state_dict())
    images = tiny_images(model, batch=16)
    labels, groups = torch.arange(16) % 2, torch.arange(16) % 4
    refit = refit_head_groups(model, images, labels, groups, C=(1.0, 0.1), fits=3, progress=False)
    assert model.training and set(refit.scores) == {1.0, 0.1}
    after = model.state_dict()
    assert {name for name in before if not torch.equal(before[name], after[name])} == {"head.weight", "head.bias"}
    again = tiny_model(num_classes=2)
    refit_head_groups(again, images, labels, groups, C=(1.0, 0.1), fits=3, progress=False)
    assert torch.equal(again.head.weight, model.head.weight) and torch.equal(again.head.bias, model.head.bias)
    assert refit_head_groups(again, images[:4], labels[:4], groups[:4], C=(0.3,), fits=1,
                             progress=False).scores == {}  # one image per group: fine without a choice of C


def test_the_group_refit_names_bad_groups_and_labels():
    model = tiny_model(num_classes=2)
    images = tiny_images(model, batch=8)
    labels, groups = torch.arange(8) % 2, torch.arange(8) % 4
    head = model.head.weight.clone()
    with pytest.raises(ValueError, match=r"no image of group\(s\) \[4\]"):
        refit_head_groups(model, images, labels, groups, num_groups=5, progress=False)
    with pytest.raises(ValueError, match=r"no image of group\(s\) \[1\]"):
        refit_head_groups(model, images, labels, torch.where(groups == 1, 3, groups), progress=False)
    with pytest.raises(ValueError, match=r"no image of class\(es\) \[1\]"):
        refit_head_groups(model, images, torch.zeros_like(labels), groups, progress=False)
    with pytest.raises(ValueError, match="group 3 has one image"):
        refit_head_groups(model, images[:7], labels[:7], groups[:7], progress=False)
    with pytest.raises(ValueError, match=r"groups must lie in \[0, 3\)"):
        refit_head_groups(model, images, labels, groups, num_groups=3, progress=False)
    with pytest.raises(ValueError, match="groups must be"):
        refit_head_groups(model, images, labels, groups.float(), progress=False)
    with pytest.raises(ValueError, match="labels must be"):
        refit_head_groups(model, images, labels[:4], groups, progress=False)
    assert torch.equal(model.head.weight, head)  # refused before any work


def test_models_without_one_linear_head_are_refused():
    images = torch.zeros(2, 3, 32, 32)
    masks, labels = torch.zeros(2, 32, 32), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="VisionTransformerDistilled has 2 heads"):
        refit_head(tiny_model("deit_distilled", num_classes=2), images, masks, labels)
    with pytest.raises(ValueError, match="needs a linear classifier.*has Identity: create the model with num_classes"):
        refit_head(tiny_model(num_classes=0), images, masks, labels)
    custom = tiny_model(num_classes=2)
    custom.head = nn.Sequential(nn.Linear(32, 2))
    with pytest.raises(ValueError, match="has Sequential"):
        linear_classifier(custom)
    custom.head = nn.Linear(32, 2, bias=False)
    with pytest.raises(ValueError, match="needs a head with a bias"):
        linear_classifier(custom)
    with pytest.raises(TypeError, match="needs a timm model.*got Linear"):
        linear_classifier(nn.Linear(3, 2))


def test_bad_masks_and_labels_are_named():
    model = tiny_model(num_classes=3)
    images, masks, labels = _masked(model, per_class=2, num_classes=3)
    with pytest.raises(ValueError, match=r"no masked image of class\(es\) \[2\]"):
        refit_head(model, images, masks, labels.clamp(max=1), progress=False)
    empty = masks.clone()
    empty[labels == 2] = 0
    with pytest.raises(ValueError, match=r"class\(es\) \[2\]"):
        refit_head(model, images, empty, labels, progress=False)
    for fill in (0.0, 1.0):
        with pytest.raises(ValueError, match="every mask is empty or full"):
            refit_head(model, images, torch.full_like(masks, fill), labels, progress=False)
    with pytest.raises(ValueError, match="class 0 has one masked image"):
        refit_head(model, images[1:], masks[1:], labels[1:], progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        refit_head(model, images, masks, labels + 1, progress=False)
    with pytest.raises(ValueError, match="labels must be"):
        refit_head(model, images, masks, labels.float(), progress=False)
    with pytest.raises(ValueError, match="masks"):
        refit_head(model, images, masks[:, :8], labels, progress=False)
    with pytest.raises(ValueError, match="C must hold positive"):
        refit_head(model, images, masks, labels, C=(0.0,), progress=False)
    assert DFR_C == (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
