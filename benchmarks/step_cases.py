"""The measured cases of the step-time benchmark: each yields a callable that runs one step.

- ``plain_fused``      cross-entropy finetune step as timm runs it by default (fused SDPA attention)
- ``plain_explicit``   the same step on the explicit softmax path
- ``relevance_floor``  the work no exact GAE step can skip: a forward that keeps the maps, the
                       gradient of the target logits w.r.t. every map, the plain backward
- ``second_order_floor``  the same with the map gradients in the graph and the loss through them
- ``relevance``        ``attach_gae`` + ``RelevanceRegularizer``: constant gradients, one forward
- ``relevance_fused``  the same with ``attach_gae(model, attention="fused")``: SDPA kept, the cam
                       rows built by the chunked kernel (``relevance_finetune.gae.fused``)
- ``relevance_fused_autograd``  the same by autograd through checkpointed chunks (the fallback)
- ``relevance_fused_floor``  the floor on fused attention: SDPA's forward, the gradient of the
                       target logits w.r.t. every attention output, the plain backward (no map)
- ``relevance_fused_products``  that floor plus the fused kernel's six attention-sized products per
                       block in its chunks (``kernel_products``): the least any chunked kernel pays
- ``second_order``     the same with ``attach_gae(model, second_order=True)``
- ``reference``        the paper's reference algorithm (``step_reference``)
- ``explain`` / ``reference_explain``   explanation throughput (images/s), no weight update
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention

from relevance_finetune import RelevanceRegularizer, attach_gae
from relevance_finetune.gae import fused
from step_reference import ReferenceGAE, reference_explain, reference_loss
from step_workload import Phase, Workload

STEP_CASES = ("plain_fused", "plain_explicit", "relevance_floor", "relevance", "relevance_fused", "second_order_floor",
              "second_order", "reference")
EXPLAIN_CASES = ("explain", "reference_explain")
Step = Callable[[Phase], object]


@contextlib.contextmanager
def plain_case(work: Workload, explicit: bool) -> Iterator[Step]:
    """Cross-entropy with the labels; timm's default attention path unless ``explicit``."""
    attention = [m for m in work.model.modules() if isinstance(m, Attention)]
    flags = [m.fused_attn for m in attention]
    for module in attention:
        module.fused_attn = module.fused_attn and not explicit
    try:
        def step(phase: Phase) -> None:
            with work.autocast(), phase("forward"):
                loss = F.cross_entropy(work.model(work.images), work.labels)
            work.update(loss, phase)
        yield step
    finally:
        for module, flag in zip(attention, flags):
            module.fused_attn = flag


@contextlib.contextmanager
def relevance_case(work: Workload, second_order: bool, attention: str = "explicit") -> Iterator[Step]:
    with attach_gae(work.model, second_order=second_order, attention=attention) as gae:
        gae.chunk_elements = work.config.chunk_elements
        criterion = RelevanceRegularizer(gae)

        def step(phase: Phase) -> None:
            with work.autocast():
                with phase("forward"):
                    logits = work.model(work.images)
                with phase("relevance + loss"):
                    loss = criterion(logits, work.masks, labels=work.labels).loss
            work.update(loss, phase)
        yield step


@contextlib.contextmanager
def fused_autograd_case(work: Workload) -> Iterator[Step]:
    """``attention="fused"`` by autograd through checkpointed chunks: the kernel's fallback, and
    the implementation before the fused kernel (issue 22), for before/after in one process."""
    kernel_dtypes = fused._KERNEL_DTYPES
    fused._KERNEL_DTYPES = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with relevance_case(work, second_order=False, attention="fused") as step:
                yield step
    finally:
        fused._KERNEL_DTYPES = kernel_dtypes


@contextlib.contextmanager
def relevance_floor_case(work: Workload, second_order: bool, attention: str = "explicit",
                         products: bool = False) -> Iterator[Step]:
    """Only what any exact GAE step must compute: no rollout, no relevance loss.

    Explicit attention: the gradients w.r.t. the kept maps; fused: w.r.t. the attention outputs
    (what the fused kernel starts from; no map is built), and with ``products`` the kernel's six
    attention-sized products per block on top (:func:`kernel_products`). Second order: the map
    gradients stay in the graph and the loss reaches the weights through them (their sum), which
    costs the double backward every second-order loss pays.
    """
    with attach_gae(work.model, attention=attention) as gae:
        def step(phase: Phase) -> None:
            with work.autocast():
                with phase("forward"):
                    logits = work.model(work.images)
                with phase("map gradients"):
                    score = logits.gather(1, work.labels[:, None]).sum()
                    sources = [record.out if attention == "fused" else record for record in gae.attention_maps]
                    grads = torch.autograd.grad(score, sources, retain_graph=True, create_graph=second_order)
                if products:
                    with phase("kernel products"):
                        for call, grad in zip(gae.attention_maps, grads):
                            kernel_products(call, grad, work.config.chunk_elements)
                loss = F.cross_entropy(logits, work.labels)
                if second_order:
                    loss = loss + sum(grad.sum() for grad in grads)
            work.update(loss, phase)
        yield step


def kernel_products(call: fused.SDPACall, grad_out: torch.Tensor, chunk_elements: int | None) -> None:
    """The fused kernel's attention-sized products on one block's operands, in its layouts and
    chunks of rows, and nothing else: the scores and dO v^T in its forward, both again, dS k and
    dS^T q in its backward."""
    batch, heads, tokens, _ = call.q.shape
    dtype = fused._KERNEL_DTYPES.get(call.q.dtype, call.q.dtype)
    rows = fused.chunk_rows(batch, heads, tokens, dtype, call.q.device, chunk_elements)
    chunks = fused._Chunks(call.q, call.k, call.v, grad_out, None, call.lse, call.scale, dtype, rows)
    grad_k = torch.zeros(chunks.scaled_q.shape, dtype=dtype, device=call.q.device)
    for start in range(0, tokens, rows):
        stop = min(start + rows, tokens)
        for _ in range(2):
            scores = torch.bmm(chunks.q_lse[:, start:stop], chunks.k_t, out=chunks.buffer(0, start, stop))
            torch.bmm(chunks.grad_out[:, start:stop], chunks.v_t, out=chunks.buffer(1, start, stop))
        torch.bmm(scores, chunks.k)
        grad_k.baddbmm_(scores.transpose(1, 2), chunks.scaled_q[:, start:stop])


@contextlib.contextmanager
def reference_case(work: Workload) -> Iterator[Step]:
    with ReferenceGAE(work.model) as ref:
        def step(phase: Phase) -> None:
            with work.autocast():
                loss = reference_loss(ref, work, phase)
            work.update(loss, phase)
        yield step


@contextlib.contextmanager
def explain_case(work: Workload) -> Iterator[Step]:
    with attach_gae(work.model) as gae:
        def step(phase: Phase) -> torch.Tensor:
            with work.autocast(), phase("explain"):
                return gae.explain(work.images)
        yield step


@contextlib.contextmanager
def reference_explain_case(work: Workload) -> Iterator[Step]:
    with ReferenceGAE(work.model) as ref, torch.no_grad():
        def step(phase: Phase) -> torch.Tensor:
            with work.autocast():
                return reference_explain(ref, work.images, phase)
        yield step


CASES: dict[str, Callable[[Workload], ContextManager[Step]]] = {
    "plain_fused": lambda work: plain_case(work, explicit=False),
    "plain_explicit": lambda work: plain_case(work, explicit=True),
    "relevance_floor": lambda work: relevance_floor_case(work, second_order=False),
    "relevance_fused_floor": lambda work: relevance_floor_case(work, second_order=False, attention="fused"),
    "relevance_fused_products": lambda work: relevance_floor_case(work, second_order=False, attention="fused",
                                                                  products=True),
    "relevance": lambda work: relevance_case(work, second_order=False),
    "relevance_fused": lambda work: relevance_case(work, second_order=False, attention="fused"),
    "relevance_fused_autograd": fused_autograd_case,
    "second_order_floor": lambda work: relevance_floor_case(work, second_order=True),
    "second_order": lambda work: relevance_case(work, second_order=True),
    "reference": reference_case,
    "explain": explain_case,
    "reference_explain": reference_explain_case,
}
