"""Could a one-layer draft that reads the target's hidden state be close enough for SMC-SD?

A draft of the EAGLE kind (:class:`FeatureDraft`): block step k reads the target's pre-norm last
hidden state at the position before (step 1: the target's own, from the verify; k > 1: the draft's
prediction of it) with the embedding of the token drawn there, and predicts the next hidden state
through ``fc([embed; feature])`` and one Llama decoder layer; the target's final norm and LM head
turn that into next-token logits. A step is one decoder layer, the fc and the LM head, so on a GPU
it would cost about what the shipped 2-layer draft's does (an estimate, not measured); it is worth
having only if it is much closer to the target than that draft. SMC-SD at N=8 keeps the target's
quality up to a KL of about 0.5 nats/token (BENCHMARKS.md, "How close must a draft be?").

The script samples the embedded SmolLM2-135M-Instruct's answers (temperature ``--tau``, at most
``--max-new`` tokens) to chat prompts (the distillation instructions and the FreshQA questions after
the first 200), records the target's hidden states along them, and trains the draft. Loss: the
symmetric KL (``--kl sym``, the default) or KL(target || draft) (``--kl fwd``) of the next-token
distributions at ``--tau``, plus ``--reg`` times a smooth-L1 regression on the hidden state; with
``--unroll`` extra passes that read the draft's own predictions (see :func:`train_loss`). Then it
measures KL both ways, top-1 agreement and sum_v min(p, q) at block steps 1..K along held-out
target answers to questions drawn from the first 200 FreshQA questions (three random anchors an
answer). It is a study, not a draft the engine can load.

    OMP_NUM_THREADS=2 python benchmarks/feature_draft_study.py --train-seqs 1536 --eval-seqs 64 \
        --minutes 14 --K 4 --positions 192 --lr 2e-3 --unroll 1 --noise 0.05 --seed 1 --out OUT
    python benchmarks/feature_draft_study.py --device cuda --train-seqs 12288 --sample-batch 1024 \
        --eval-seqs 128 --minutes 3 --batch 128 --K 8 --lr 2e-3 --unroll 1 --noise 0.05 --out OUT
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from fidelity import chat_ids, load_questions
from torch import nn

from smcgen.distill_samples import (
    INSTRUCTIONS,
    _log_probs,
    _positions,
    chat_prompts,
    divergence_terms,
    kl_terms,
    sample_from_target,
)
from smcgen.models.smollm2 import EMBEDDED_TARGET, load_embedded


class FeatureDraft(nn.Module):
    """fc([embed(x_{i+1}); f_i]) -> one Llama decoder layer -> predicted f_{i+1}.

    f_i is the target's pre-norm last hidden state at position i and x_{i+1} the token drawn from
    that position's logits; the target's norm and head turn a predicted f_{i+1} into logits for x_{i+2}.
    """

    def __init__(self, target):
        super().__init__()
        d = target.config.hidden_size
        self.fc = nn.Linear(2 * d, d, bias=True)
        # the target's last decoder layer, trained from there; its residual branches start near zero
        # and the fc passes the feature through, so the draft starts close to "the next state is this one"
        self.layer = copy.deepcopy(target.model.layers[-1]).requires_grad_(True)
        with torch.no_grad():
            self.fc.weight.mul_(0.1)
            self.fc.weight[:, d:] += torch.eye(d)
            self.fc.bias.zero_()
            self.layer.self_attn.o_proj.weight.mul_(0.1)
            self.layer.mlp.down_proj.weight.mul_(0.1)
        # the target's embedding, rotary table, norm and head are shared and frozen: a list keeps them
        # out of this module's parameters and state_dict
        self._target = [target]

    def forward(self, feats, tokens, pos, keymask):
        """feats [B,T,d], tokens [B,T] (token i+1 paired with feature i), pos [B,T], keymask [B,T] bool."""
        t = self._target[0]
        x = self.fc(torch.cat([t.model.embed_tokens(tokens), feats], -1))
        T = x.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        mask = causal[None, None] & keymask[:, None, None, :]
        mask = mask | torch.eye(T, dtype=torch.bool, device=x.device)[None, None]  # pads see themselves: no NaN
        out = self.layer(x, attention_mask=mask, position_ids=pos, position_embeddings=t.model.rotary_emb(x, pos))
        return out[0] if isinstance(out, tuple) else out

    def logits(self, feats):
        t = self._target[0]
        return t.lm_head(t.model.norm(feats))


@torch.no_grad()
def features(target, ids, real, chunk=16):
    """Pre-norm last hidden states [B, L, d] of the target on left-padded ids."""
    got = []
    hook = target.model.norm.register_forward_pre_hook(lambda mod, args: got.append(args[0].detach()))
    out = []
    try:
        for s in range(0, ids.shape[0], chunk):
            got.clear()
            target.model(
                input_ids=ids[s : s + chunk],
                attention_mask=real[s : s + chunk].long(),
                position_ids=_positions(real[s : s + chunk]),
            )
            out.append(got[-1])
    finally:
        hook.remove()
    return torch.cat(out)


def make_data(target, prompts, n, batch, max_new, tau, gen):
    """``n`` target answers at ``tau`` in left-padded batches: (ids, real, scored, pre-norm features) each."""
    rows = []
    for s in range(0, n, batch):
        b = sample_from_target(
            target, prompts, min(batch, n - s), max_new, [target.config.eos_token_id], gen, temperature=tau
        )
        f = features(target, b.ids, b.real)
        rows.append((b.ids, b.real, b.scored, f))
        print(f"  sampled {s + b.ids.shape[0]}/{n}", flush=True)
    return rows


#: --kl's names for :data:`smcgen.distill_samples.DIVERGENCES`
KL_KINDS = {"fwd": "forward", "sym": "symmetric"}


def train_loss(draft, ids, real, scored, f, tau, unroll, noise, gen, positions=0, kl_kind="sym", reg_w=0.1):
    """A teacher-forced pass, then ``unroll`` passes in which every position but the first reads the
    draft's prediction for it from the pass before. At inference only a block's positions hold
    predictions (the context before holds the target's true states), so this is a rougher mismatch
    than the draft meets there."""
    inp_f, inp_t = f[:, :-1], ids[:, 1:]
    pos = _positions(real)[:, :-1]
    keym = real[:, :-1]
    tgt_f = f[:, 1:]
    sel = scored[:, 1:] & real[:, :-1]  # position i+1 predicts token i+2: a scored position
    if positions and int(sel.sum()) > positions:  # a random subset keeps the vocabulary work small
        where = torch.nonzero(sel.flatten()).flatten()
        keep = where[torch.randperm(len(where), generator=gen)[:positions].to(where.device)]
        sel = torch.zeros_like(sel).flatten()
        sel[keep] = True
        sel = sel.view_as(scored[:, 1:])
    scale = f[real].pow(2).mean().sqrt()
    total, parts = 0.0, []
    cur = inp_f
    for _ in range(unroll + 1):
        if noise > 0:
            cur = cur + ((torch.rand(cur.shape, generator=gen) * 2 - 1) * noise).to(cur.device) * scale
        pred = draft(cur, inp_t, pos, keym)
        reg = F.smooth_l1_loss(pred[sel] / scale, tgt_f[sel] / scale)
        with torch.no_grad():
            p_logits = draft.logits(tgt_f[sel])
        div = divergence_terms(p_logits, draft.logits(pred[sel]), tau, KL_KINDS[kl_kind]).mean()
        total = total + (div + reg_w * reg) / (unroll + 1)
        parts.append(float(div.detach()))
        # next pass: position i reads the prediction made for it (f_hat_i) instead of f_i
        cur = torch.cat([inp_f[:, :1], pred[:, :-1]], 1)
    return total, parts


@torch.no_grad()
def eval_steps(draft, data, tau, K, anchors_per_seq, gen):
    """KL(p||q), KL(q||p), top-1 agreement and sum min(p,q) at draft steps 1..K along held-out target samples."""
    stats = {k: [[], [], [], []] for k in range(1, K + 1)}
    for ids, real, scored, f in data:
        B, L = ids.shape
        pos_all = _positions(real)
        for _ in range(anchors_per_seq):
            # anchor a: last verified position (its feature is the target's); needs a+K+1 real tokens
            anchors = []
            for b in range(B):
                ok = torch.nonzero(scored[b]).flatten().cpu()
                ok = ok[(ok + K + 1 < L)]
                ok = ok[real[b].cpu()[(ok + K + 1).clamp(max=L - 1)]]
                anchors.append(int(ok[torch.randint(len(ok), (1,), generator=gen)]) if len(ok) else -1)
            rows = [b for b in range(B) if anchors[b] >= 0]
            if not rows:
                continue
            dev = ids.device
            a = torch.tensor([anchors[b] for b in rows], device=dev)
            top = int(a.max()) + K + 1
            ff = f[rows, :top].clone()
            tt = ids[rows, 1 : top + 1]
            pp = pos_all[rows, :top]
            km = real[rows, :top].clone()
            ri = torch.arange(len(rows), device=dev)
            truth = f[rows]
            for k in range(1, K + 1):
                # positions a+1..a+k-1 hold predicted features (the causal mask already hides later ones)
                pred = draft(ff, tt, pp, km)
                idx = a + k - 1
                ph = pred[ri, idx]
                p_logits, q_logits = draft.logits(truth[ri, idx + 1]), draft.logits(ph)
                fwd, rev = kl_terms(p_logits, q_logits, tau), kl_terms(q_logits, p_logits, tau)
                lp, lq = _log_probs(p_logits, q_logits, tau)
                agree = (lp.argmax(-1) == lq.argmax(-1)).float()
                ov = torch.minimum(lp.exp(), lq.exp()).sum(-1)
                for j, x in enumerate((fwd, rev, agree, ov)):
                    stats[k][j] += x.tolist()
                ff[ri, idx + 1] = ph  # the next step reads the prediction
    return {k: [sum(v) / len(v) for v in s] for k, s in stats.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts-file", default=None, help="one JSON string per line (instead of inspect-evals)")
    ap.add_argument("--train-seqs", type=int, default=384)
    ap.add_argument("--eval-seqs", type=int, default=48)
    ap.add_argument("--sample-batch", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--tau", type=float, default=0.7)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--unroll", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--kl", choices=list(KL_KINDS), default="sym", help="fwd: KL(target || draft); sym: both")
    ap.add_argument("--reg", type=float, default=0.1)
    ap.add_argument("--positions", type=int, default=0, help="scored positions per pass (0: all)")
    ap.add_argument("--init", default=None, help="continue from a featdraft.pt this script wrote")
    ap.add_argument("--data", default=None, help="cache of the sampled data (torch.save)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    target, tok = load_embedded(EMBEDDED_TARGET, device=dev)
    target.requires_grad_(False)
    qs = load_questions(args.prompts_file)
    train_prompts = chat_prompts(tok, INSTRUCTIONS) + [chat_ids(tok, q) for q in qs[200:]]
    eval_prompts = [chat_ids(tok, q) for q in qs[:200]]
    gen = torch.Generator(dev).manual_seed(args.seed)
    t0 = time.time()
    if args.data and Path(args.data).exists():
        train, held = torch.load(args.data)
    else:
        train = make_data(target, train_prompts, args.train_seqs, args.sample_batch, args.max_new, args.tau, gen)
        held = make_data(target, eval_prompts, args.eval_seqs, args.sample_batch, args.max_new, args.tau, gen)
        if args.data:
            torch.save((train, held), args.data)
    t_sample = time.time() - t0
    print(f"sampling {t_sample:.0f} s", flush=True)
    draft = FeatureDraft(target).to(dev)
    if args.init:
        draft.load_state_dict(torch.load(args.init, map_location=dev))
    cpu_gen = torch.Generator().manual_seed(args.seed)
    # a quick look before training (one anchor an answer); the reported figures use three
    before = eval_steps(draft, held, args.tau, args.K, 1, torch.Generator().manual_seed(1))
    print("before:", {k: [round(x, 3) for x in v] for k, v in before.items()}, flush=True)
    opt = torch.optim.AdamW(draft.parameters(), lr=args.lr, weight_decay=0.0)
    step, t1, hist = 0, time.time(), []
    budget = args.minutes * 60
    while time.time() - t1 < budget:
        # a minibatch from one sampled batch (each is left-padded to its own width)
        ids, real, scored, f = train[int(torch.randint(len(train), (1,), generator=cpu_gen))]
        pick = torch.randint(ids.shape[0], (args.batch,), generator=cpu_gen).to(ids.device)
        ids, real, scored, f = ids[pick], real[pick], scored[pick], f[pick]
        frac = (time.time() - t1) / budget
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 20) * (0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        loss, parts = train_loss(
            draft, ids, real, scored, f, args.tau, args.unroll, args.noise, cpu_gen, args.positions, args.kl, args.reg
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        step += 1
        hist.append([step, float(loss.detach()), parts])
        if step % 20 == 0:
            by_pass = [round(p, 3) for p in parts]
            print(
                f"step {step} {time.time() - t1:.0f}s loss {float(loss):.3f} divergence by pass {by_pass}", flush=True
            )
    after = eval_steps(draft, held, args.tau, args.K, 3, torch.Generator().manual_seed(1))
    print("after:", flush=True)
    for k, v in after.items():
        print(f"  step {k}: KL(p||q) {v[0]:.3f}  KL(q||p) {v[1]:.3f}  top1 {v[2]:.3f}  overlap {v[3]:.3f}", flush=True)
    res = dict(
        args=vars(args),
        steps=step,
        train_seconds=time.time() - t1,
        sample_seconds=t_sample,
        before=before,
        after=after,
        hist=hist[::10],
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "featdraft.json").write_text(json.dumps(res, indent=1))
    torch.save(draft.state_dict(), Path(args.out, "featdraft.pt"))


if __name__ == "__main__":
    main()
