"""The ops as registered torch.library ops: schemas, fake kernels and autograd pass `torch.library.opcheck`, and
`torch.compile(fullgraph=True)` traces a transformers model on the mem1_fast attention under a visibility, and a
module calling logprob_entropy / ppo_loss, in one graph each, equal to eager (forward and gradients)."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import mem1_fast.hf as mhf
from mem1_fast.ops import logprob_entropy, ppo_loss, state_attention
from mem1_fast.ops.logprob_entropy import available_backends as le_backends
from mem1_fast.ops.state_attention import available_backends as sa_backends
from mem1_fast.tiny import tiny_qwen2
from mem1_fast.visibility import Visibility

OPS = torch.ops.mem1_fast


def _vis(T, cut, seed=0):
    """Causal, except rows from `cut` on lose a random-length prefix (a consolidated state's view)."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.zeros(T, 1, dtype=torch.int32)
    lo[cut:, 0] = torch.randint(1, cut, (T - cut,), generator=g, dtype=torch.int32)
    return Visibility(lo, torch.arange(1, T + 1, dtype=torch.int32)[:, None]).validate()


# --- opcheck: schema, fake kernel against the real one, autograd registration, AOT dispatch ---------------------------
@pytest.mark.parametrize("backend", ["", "cpp"])
def test_state_attention_passes_opcheck(backend):
    if backend and backend not in sa_backends("cpu"):
        pytest.skip(f"{backend} not built")
    torch.manual_seed(1)
    vis = _vis(37, 9)
    q = torch.randn(37, 4, 16, requires_grad=True)
    k, v = (torch.randn(37, 2, 16, requires_grad=True) for _ in range(2))
    torch.library.opcheck(OPS.state_attention, (q, k, v, vis.lo, vis.hi, 0.25, backend, False))


@pytest.mark.parametrize("backend", ["", "reference", "cpp"])
def test_logprob_entropy_passes_opcheck(backend):
    if backend and backend not in le_backends("cpu"):
        pytest.skip(f"{backend} not built")
    torch.manual_seed(2)
    h = torch.randn(11, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    t = torch.randint(0, 30, (11,))
    torch.library.opcheck(OPS.logprob_entropy, (h, w, t, 0.7, backend))
    torch.library.opcheck(OPS.logprob_entropy, (h.double(), w.double(), t, 1.0, backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["", "reference"])
def test_ppo_loss_passes_opcheck(backend, dtype):
    torch.manual_seed(3)
    h = torch.randn(11, 8, dtype=dtype)
    w = torch.randn(30, 8, dtype=dtype)
    t = torch.randint(0, 30, (11,))
    old, adv, ref = torch.randn(11) - 3, torch.randn(11), torch.randn(11) - 3
    for need in ((True, True), (False, True), (True, False)):
        args = (h.clone().requires_grad_(need[0]), w.clone().requires_grad_(need[1]), t, old, adv, ref, 0.9, 0.2,
                0.01, 0.05, 11.0, torch.rand(11), *need, backend)
        # the op returns its gradients as outputs (computed in the forward pass), so autograd is checked below by
        # comparing with the reference, not by opcheck's numerical test of every output
        torch.library.opcheck(OPS.ppo_loss, args, test_utils=("test_schema", "test_faketensor"))


def test_permuted_inputs_get_the_layout_the_fake_promises():
    """A query that is a transposed view of a [H, T, D]-contiguous tensor (what a model's attention hands over):
    the real outputs have the fake kernel's (contiguous) strides, forward and backward."""
    torch.manual_seed(10)
    vis = _vis(33, 9)
    q = torch.randn(4, 33, 16).transpose(0, 1).requires_grad_()
    k, v = (torch.randn(2, 33, 16).transpose(0, 1).requires_grad_() for _ in range(2))
    assert not q.is_contiguous()
    torch.library.opcheck(OPS.state_attention, (q, k, v, vis.lo, vis.hi, 0.25, "", False))
    out = state_attention(q, k, v, vis)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert out.is_contiguous() and all(g.shape == x.shape for g, x in zip((dq, dk, dv), (q, k, v)))


def test_op_checks_values_where_compiled_code_cannot():
    """Range checks of the targets run inside the op (a data-dependent check would break a compiled graph)."""
    with pytest.raises(ValueError, match=r"target ids must lie in \[0, 30\)"):
        logprob_entropy(torch.randn(3, 8), torch.randn(30, 8), torch.tensor([0, 30, 1]))
    with pytest.raises(ValueError, match=r"target ids must lie in \[0, 30\)"):
        ppo_loss(torch.randn(3, 8), torch.randn(30, 8), torch.tensor([0, -1, 1]), torch.zeros(3), torch.ones(3))


# --- torch.compile(fullgraph=True) -------------------------------------------------------------------------------
def _grads(params):
    return [p.grad.clone() for p in params]


def test_compiled_transformers_model_on_the_visibility_is_one_graph_and_equals_eager():
    """Tiny Qwen2 (GQA) on `attn_implementation="mem1_fast"` with `visibility=` as a forward keyword, compiled with
    inductor and fullgraph=True: one graph for two different visibilities of one length, hidden states and every
    parameter's gradient equal to eager. Negative control: causal attention (no visibility) differs."""
    torch.manual_seed(0)
    model = tiny_qwen2(64, init_std=0.1)
    T = 48
    ids, pos = torch.randint(0, 64, (T,)), torch.arange(T)
    # a random projection, not a sum of squares: after the final RMSNorm that is nearly constant, and its
    # gradients would be rounding noise
    proj = torch.randn(T, model.config.hidden_size)

    def hidden(ids, pos, vis):
        return model.model(input_ids=ids[None], position_ids=pos[None], visibility=vis,
                           use_cache=False).last_hidden_state[0]

    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(hidden, fullgraph=True, backend=cnt)
    params = list(model.parameters())
    for seed in (0, 1):
        vis = _vis(T, 20, seed)
        model.zero_grad()
        eager = hidden(ids, pos, vis)
        (eager * proj).sum().backward()
        g_eager = _grads(params)
        model.zero_grad()
        got = compiled(ids, pos, vis)
        (got * proj).sum().backward()
        assert (got - eager).abs().max() < 1e-5
        for a, b in zip(_grads(params), g_eager):
            assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max())
    assert cnt.frame_count == 1  # one graph, no recompilation for a new visibility
    causal = model.model(input_ids=ids[None], position_ids=pos[None], use_cache=False).last_hidden_state[0]
    assert (causal - eager).abs().max() > 1e-2


def test_compiled_forward_inside_the_context_block_raises():
    """Compiled code cannot read the `visibility()` context variable: it says so instead of attending causally."""
    model = tiny_qwen2(64, init_std=0.1)
    T = 16
    compiled = torch.compile(lambda ids: model.model(input_ids=ids[None], use_cache=False).last_hidden_state,
                             fullgraph=True, backend="eager")
    with mhf.visibility(_vis(T, 8)), pytest.raises(Exception, match="pass visibility=vis"):
        compiled(torch.randint(0, 64, (T,)))


class _Head(torch.nn.Module):
    """What a trainer's loss module does: LM-head statistics and the PPO loss straight from hidden states."""

    def __init__(self, V, H):
        super().__init__()
        self.proj = torch.nn.Linear(H, H)
        self.lm_head = torch.nn.Linear(H, V, bias=False)

    def forward(self, x, targets, old_logp, adv):
        h = torch.tanh(self.proj(x))
        logp, ent = logprob_entropy(h, self.lm_head.weight, targets, temperature=0.8)
        loss, _, _ = ppo_loss(h, self.lm_head.weight, targets, old_logp, adv, temperature=0.8, entropy_coef=0.01)
        return loss + 0.1 * (logp.mean() - ent.mean())


def test_compiled_module_calling_logprob_entropy_and_ppo_loss_is_one_graph_and_equals_eager():
    torch.manual_seed(4)
    V, H, N = 300, 16, 40
    mod = _Head(V, H)
    x, t = torch.randn(N, H), torch.randint(0, V, (N,))
    old, adv = torch.randn(N) - 5, torch.randn(N)
    cnt = CompileCounterWithBackend("aot_eager")  # AOT autograd traces forward and backward through the fakes
    compiled = torch.compile(mod, fullgraph=True, backend=cnt)
    mod.zero_grad()
    eager = mod(x, t, old, adv)
    eager.backward()
    g_eager = _grads(mod.parameters())
    mod.zero_grad()
    got = compiled(x, t, old, adv)
    got.backward()
    assert cnt.frame_count == 1
    assert (got - eager).abs() < 1e-5
    for a, b in zip(_grads(mod.parameters()), g_eager):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max())


def test_compiled_ppo_loss_scales_its_gradient():
    """Inside a compiled graph the fused loss's gradients are scaled by the upstream gradient (3 * loss here);
    checked against the reference backend in eager."""
    torch.manual_seed(5)
    h = torch.randn(20, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    t, old, adv = torch.randint(0, 50, (20,)), torch.randn(20) - 4, torch.randn(20)
    f = torch.compile(lambda h, w: 3 * ppo_loss(h, w, t, old, adv)[0], fullgraph=True, backend="aot_eager")
    f(h, w).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (3 * ppo_loss(h, w, t, old, adv, backend="reference")[0]).backward()
    assert (gh - h.grad).abs().max() < 1e-5 and (gw - w.grad).abs().max() < 1e-5
    assert (gh - h.grad / 3).abs().max() > 1e-4  # negative control: unscaled gradients would differ


def test_state_attention_front_and_op_agree():
    """The public function is the op plus argument handling: same output as calling torch.ops directly."""
    torch.manual_seed(6)
    vis = _vis(30, 10)
    q, k, v = torch.randn(30, 2, 8), torch.randn(30, 1, 8), torch.randn(30, 1, 8)
    out, lse = state_attention(q, k, v, vis, scale=0.3, return_lse=True)
    o2, l2 = OPS.state_attention(q, k, v, vis.lo, vis.hi, 0.3, "", False)
    assert torch.equal(out, o2) and torch.equal(lse, l2)


def test_ops_fall_back_to_the_reference_inside_the_op(monkeypatch):
    """When no kernel takes the input (here: none is built, as on a machine without a compiler), the registered op
    runs the reference, forward and backward, and still equals the reference function under autograd."""
    from mem1_fast.ops import _dispatch
    monkeypatch.setattr(_dispatch.Backends, "default", lambda self, x: "reference")
    torch.manual_seed(9)
    vis = _vis(25, 7)
    q = torch.randn(25, 2, 8, requires_grad=True)
    k, v = (torch.randn(25, 1, 8, requires_grad=True) for _ in range(2))
    torch.library.opcheck(OPS.state_attention, (q, k, v, vis.lo, vis.hi, 0.3, "", False))
    out = state_attention(q, k, v, vis)
    g = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = state_attention(q, k, v, vis, backend="reference")
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert (out - ref).abs().max() < 1e-6 and all((a - b).abs().max() < 1e-5 for a, b in zip(g, g_ref))
    h, w = torch.randn(9, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    t, old, adv = torch.randint(0, 20, (9,)), torch.randn(9) - 3, torch.randn(9)
    g = torch.autograd.grad(ppo_loss(h, w, t, old, adv, entropy_coef=0.1)[0], (h, w))
    g_ref = torch.autograd.grad(ppo_loss(h, w, t, old, adv, entropy_coef=0.1, backend="reference")[0], (h, w))
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(g, g_ref))


def test_dtensor_inputs_get_an_error_that_says_what_to_pass(tmp_path):
    """A DTensor (here on a 1-rank gloo mesh) is refused with a message naming `.to_local()` / `.full_tensor()`;
    its local tensor works and equals the plain call."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        h, w, t = torch.randn(6, 8), torch.randn(20, 8), torch.randint(0, 20, (6,))
        wd = distribute_tensor(w, mesh, [Shard(0)])
        with pytest.raises(TypeError, match=r"weight is a DTensor.*full_tensor\(\)"):
            logprob_entropy(h, wd, t)
        got = logprob_entropy(h, wd.full_tensor(), t)
        want = logprob_entropy(h, w, t)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    finally:
        dist.destroy_process_group()
