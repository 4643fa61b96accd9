"""Meta-gradients against autograd through an explicitly unrolled loop and finite differences."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metanmt.config import AlgorithmConfig
from metanmt.engine.algorithms.fomaml import FOMAML
from metanmt.engine.algorithms.maml import MAML
from metanmt.engine.algorithms.multitask import MultiTask
from metanmt.engine.algorithms.reptile import Reptile
from metanmt.engine.inner import InnerLoop, select_names
from metanmt.errors import ConfigError

from .conftest import double_episode


def setup(family, seed=0):
    torch.manual_seed(seed)
    model = family.build_model().double()
    params = {n: p for n, p in model.named_parameters()}
    return model, params, double_episode(family, seed)


def flat(grads, names):
    return torch.cat([grads[n].reshape(-1) for n in names])


def unrolled_maml_loss(model, params, episode, steps, lr, adapt):
    """MAML written out by hand: SGD steps that stay in the graph, then the query loss."""
    x_s, y_s = episode.support
    x_q, y_q = episode.query
    current = dict(params)
    for _ in range(steps):
        loss = F.mse_loss(functional_call(model, current, (x_s,)), y_s)
        grads = torch.autograd.grad(loss, [current[n] for n in adapt], create_graph=True)
        current = {**current, **{n: current[n] - lr * g for n, g in zip(adapt, grads)}}
    return F.mse_loss(functional_call(model, current, (x_q,)), y_q)


def finite_difference(fn, params, names, eps=1e-6):
    """Central differences of ``fn()`` w.r.t. every element of ``params[n]`` for n in ``names``."""
    out = []
    for n in names:
        p = params[n]
        g = torch.zeros_like(p)
        for i in range(p.numel()):
            with torch.no_grad():
                orig = p.view(-1)[i].item()
                p.view(-1)[i] = orig + eps
            up = fn().item()
            with torch.no_grad():
                p.view(-1)[i] = orig - eps
            down = fn().item()
            with torch.no_grad():
                p.view(-1)[i] = orig
            g.view(-1)[i] = (up - down) / (2 * eps)
        out.append(g.reshape(-1))
    return torch.cat(out)


@pytest.mark.parametrize("adapt", [["*"], ["layers.2.*"]])
def test_maml_matches_unrolled_autograd_and_finite_differences(sine_family, adapt):
    model, params, episode = setup(sine_family)
    names = list(params)
    cfg = AlgorithmConfig(name="maml", inner_steps=2, inner_lr=0.05, adapt=adapt)
    adapt_names = select_names(model, adapt)
    inner = InnerLoop(sine_family, model, adapt_names, steps=2, lr=0.05)
    result = MAML(cfg).task_gradient(inner, params, episode, {})

    unrolled = unrolled_maml_loss(model, params, episode, 2, 0.05, adapt_names)
    expected = torch.autograd.grad(unrolled, [params[n] for n in names])
    assert torch.allclose(flat(result.grads, names), torch.cat([g.reshape(-1) for g in expected]), atol=1e-12)

    fd = finite_difference(lambda: unrolled_maml_loss(model, params, episode, 2, 0.05, adapt_names), params, names)
    assert torch.allclose(flat(result.grads, names), fd, atol=1e-7, rtol=1e-5)
    # second-order terms are real here: first-order MAML gives a different answer
    fo = FOMAML(AlgorithmConfig(name="fomaml", adapt=adapt)).task_gradient(inner, params, episode, {})
    assert (flat(fo.grads, names) - fd).abs().max() > 1e-4


def test_maml_with_adam_inner_loop_matches_finite_differences(sine_family):
    model, params, episode = setup(sine_family, seed=3)
    names = list(params)
    cfg = AlgorithmConfig(name="maml", inner_steps=2, inner_lr=0.01, inner_optimizer="adam")
    inner = InnerLoop(sine_family, model, names, steps=2, lr=0.01, optimizer="adam")
    result = MAML(cfg).task_gradient(inner, params, episode, {})

    def outer():
        adapted = inner.adapt(params, episode.support, create_graph=False).params
        return inner.loss(adapted, episode.query)

    fd = finite_difference(outer, params, names)
    assert torch.allclose(flat(result.grads, names), fd, atol=1e-6, rtol=1e-4)


def test_meta_sgd_learning_rate_gradient_matches_finite_differences(sine_family):
    model, params, episode = setup(sine_family, seed=1)
    names = list(params)
    lrs = {n: torch.full_like(p, 0.03).requires_grad_() for n, p in params.items()}
    cfg = AlgorithmConfig(name="maml", inner_steps=2, meta_sgd=True)
    inner = InnerLoop(sine_family, model, names, steps=2, lr=lrs)
    result = MAML(cfg).task_gradient(inner, params, episode, lrs)

    def outer():
        adapted = inner.adapt(params, episode.support, create_graph=False).params
        return inner.loss(adapted, episode.query)

    fd_lr = finite_difference(outer, lrs, names)
    got = torch.cat([result.grads[f"inner_lr:{n}"].reshape(-1) for n in names])
    assert torch.allclose(got, fd_lr, atol=1e-7, rtol=1e-5)
    fd_params = finite_difference(outer, params, names)
    assert torch.allclose(flat(result.grads, names), fd_params, atol=1e-7, rtol=1e-5)


def test_clipped_inner_gradient_matches_finite_differences(sine_family):
    """algorithm.inner_grad_clip: the scaling is part of the graph, so MAML's meta-gradient through
    a clipped inner loop is the derivative of what that loop computes."""
    model, params, episode = setup(sine_family, seed=4)
    names = list(params)
    first = torch.autograd.grad(F.mse_loss(functional_call(model, params, (episode.support[0],)), episode.support[1]),
                                list(params.values()))
    clip = float(torch.sqrt(sum(g.pow(2).sum() for g in first))) / 3  # active: the first step is scaled by 1/3
    cfg = AlgorithmConfig(name="maml", inner_steps=2, inner_lr=0.05, inner_grad_clip=clip)
    inner = InnerLoop(sine_family, model, names, steps=2, lr=0.05, grad_clip=clip)
    result = MAML(cfg).task_gradient(inner, params, episode, {})

    def outer():
        adapted = inner.adapt(params, episode.support, create_graph=False).params
        return inner.loss(adapted, episode.query)

    assert torch.allclose(flat(result.grads, names), finite_difference(outer, params, names), atol=1e-7, rtol=1e-5)
    unclipped = MAML(AlgorithmConfig(name="maml", inner_steps=2, inner_lr=0.05)).task_gradient(
        InnerLoop(sine_family, model, names, steps=2, lr=0.05), params, episode, {})
    assert (flat(unclipped.grads, names) - flat(result.grads, names)).abs().max() > 1e-3
    # the step itself: an SGD step of lr x a gradient of norm exactly ``clip``
    adapted = InnerLoop(sine_family, model, names, steps=1, lr=0.05, grad_clip=clip).adapt(params, episode.support, False).params
    moved = torch.sqrt(sum((adapted[n] - params[n]).pow(2).sum() for n in names))
    assert float(moved) == pytest.approx(0.05 * clip, rel=1e-9)


def test_maml_plus_plus_multi_step_loss_matches_finite_differences(sine_family):
    model, params, episode = setup(sine_family, seed=2)
    names = list(params)
    cfg = AlgorithmConfig(name="maml", inner_steps=3, inner_lr=0.05, multi_step_loss=True)
    inner = InnerLoop(sine_family, model, names, steps=3, lr=0.05)
    result = MAML(cfg).task_gradient(inner, params, episode, {})

    def outer():
        losses = []
        inner.adapt(params, episode.support, create_graph=False, after_step=lambda k, p: losses.append(inner.loss(p, episode.query)))
        return torch.stack(losses).mean()

    assert torch.allclose(flat(result.grads, names), finite_difference(outer, params, names), atol=1e-7, rtol=1e-5)


def test_fomaml_is_query_gradient_at_adapted_weights(sine_family):
    model, params, episode = setup(sine_family)
    names = list(params)
    adapt = ["layers.1.*", "layers.2.*"]
    adapt_names = select_names(model, adapt)
    inner = InnerLoop(sine_family, model, adapt_names, steps=3, lr=0.05)
    result = FOMAML(AlgorithmConfig(name="fomaml", adapt=adapt)).task_gradient(inner, params, episode, {})

    with torch.no_grad():
        adapted = {n: p.clone() for n, p in params.items()}
    for _ in range(3):  # plain SGD on detached copies
        adapted = {n: t.detach().requires_grad_() for n, t in adapted.items()}
        loss = sine_family.loss(model, adapted, episode.support)
        grads = torch.autograd.grad(loss, [adapted[n] for n in adapt_names])
        adapted.update({n: adapted[n] - 0.05 * g for n, g in zip(adapt_names, grads)})
    adapted = {n: t.detach().requires_grad_() for n, t in adapted.items()}
    query = sine_family.loss(model, adapted, episode.query)
    expected = torch.autograd.grad(query, [adapted[n] for n in names])
    assert torch.allclose(flat(result.grads, names), torch.cat([g.reshape(-1) for g in expected]), atol=1e-12)


def test_support_in_outer_adds_the_support_gradient_at_the_initialization(sine_family):
    model, params, episode = setup(sine_family)
    names = list(params)
    inner = InnerLoop(sine_family, model, names, steps=1, lr=0.05)
    plain = FOMAML(AlgorithmConfig(name="fomaml")).task_gradient(inner, params, episode, {})
    joint = FOMAML(AlgorithmConfig(name="fomaml", support_in_outer=True)).task_gradient(inner, params, episode, {})
    support_grad = torch.autograd.grad(sine_family.loss(model, params, episode.support), [params[n] for n in names])
    assert torch.allclose(flat(joint.grads, names) - flat(plain.grads, names), torch.cat([g.reshape(-1) for g in support_grad]), atol=1e-12)


def test_reptile_contribution_is_init_minus_adapted_on_all_task_data(sine_family):
    model, params, episode = setup(sine_family)
    names = list(params)
    inner = InnerLoop(sine_family, model, names, steps=4, lr=0.02)
    result = Reptile(AlgorithmConfig(name="reptile")).task_gradient(inner, params, episode, {})
    batch = tuple(torch.cat([a, b]) for a, b in zip(episode.support, episode.query))
    current = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(4):
        current = {n: t.requires_grad_() for n, t in current.items()}
        grads = torch.autograd.grad(sine_family.loss(model, current, batch), list(current.values()))
        current = {n: (t - 0.02 * g).detach() for (n, t), g in zip(current.items(), grads)}
    for n in names:
        assert torch.allclose(result.grads[n], params[n].detach() - current[n], atol=1e-12)


def test_multitask_is_the_plain_gradient_on_support_and_query(sine_family):
    model, params, episode = setup(sine_family)
    names = list(params)
    inner = InnerLoop(sine_family, model, [], steps=0, lr=0.0)
    result = MultiTask(AlgorithmConfig(name="multitask")).task_gradient(inner, params, episode, {})
    x = torch.cat([episode.support[0], episode.query[0]])
    y = torch.cat([episode.support[1], episode.query[1]])
    expected = torch.autograd.grad(F.mse_loss(model(x), y), [params[n] for n in names])
    assert torch.allclose(flat(result.grads, names), torch.cat([g.reshape(-1) for g in expected]), atol=1e-12)


def test_meta_sgd_is_refused_where_it_has_no_meaning():
    with pytest.raises(ConfigError, match="meta_sgd"):
        Reptile(AlgorithmConfig(name="reptile", meta_sgd=True))


def test_adapt_patterns_that_match_nothing_name_the_parameters(sine_family):
    with pytest.raises(ConfigError, match="layers.0.weight"):
        select_names(sine_family.build_model(), ["encoder.*"])


def test_every_inner_loop_option_reaches_the_inner_loop_of_every_caller(sine_family):
    """Meta-training, evaluation and the Trainer plugin build their inner loops from the same options
    (``InnerLoop.for_algorithm``): each option arrives, and the callers' overrides replace only theirs."""
    from metanmt.hf import MetaSeq2SeqTrainingArguments

    model = sine_family.build_model()
    names = select_names(model, ["*"])
    config = AlgorithmConfig(name="maml", inner_steps=4, inner_lr=0.02, inner_optimizer="adam", inner_grad_clip=3.0)
    plugin = MetaSeq2SeqTrainingArguments(output_dir="unused", meta_algorithm="maml", inner_steps=4, inner_lr=0.02,
                                          inner_optimizer="adam", inner_grad_clip=3.0)
    for options in (config, plugin):
        inner = InnerLoop.for_algorithm(sine_family, model, names, options, tasks=2, log_metrics=False)
        assert (inner.steps, inner.lr, inner.optimizer, inner.grad_clip) == (4, 0.02, "adam", 3.0)
        assert (inner.tasks, inner.log_metrics) == (2, False)
    rates = {n: torch.full_like(p, 0.1) for n, p in model.named_parameters()}
    inner = InnerLoop.for_algorithm(sine_family, model, names, config, steps=1, lr=rates)
    assert (inner.steps, inner.lr, inner.optimizer, inner.grad_clip) == (1, rates, "adam", 3.0)
