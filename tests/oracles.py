"""fp64 dense oracles, used only by tests: the plain definitions, no chunking, no cleverness."""
import math

import torch


def attention(q, k, v, mask, scale=None):
    """q [T,Hq,D], k/v [T,Hkv,D], mask [T,T] bool. Rows with no visible key give 0 output and -inf lse."""
    q, k, v = q.double(), k.double(), v.double()
    T, Hq, D = q.shape
    g = Hq // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = 1 / math.sqrt(D) if scale is None else scale
    s = torch.einsum("thd,uhd->htu", q, k) * scale
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.where(mask, torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None]), 0)
    return torch.einsum("htu,uhd->thd", p, v), lse


def logprob_entropy(hidden, weight, targets, temperature=1.0):
    z = hidden.double() @ weight.double().T / temperature
    logp_all = torch.log_softmax(z, -1)
    p = logp_all.exp()
    return logp_all.gather(1, targets[:, None])[:, 0], -(p * logp_all).sum(-1)
