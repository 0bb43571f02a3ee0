"""Input records of the shipped ``acceptance`` golden case (the recipe's builder): dyadic
numbers that pin every rule and edge case of the RNG-v1 acceptance rule (docs/acceptance-rules.md).
Inputs only: the expected decisions are computed by ``refmtp.inference.acceptance.verify_drafts``.
"""
from __future__ import annotations

import copy
import math

# The rows of docs/speculative-decoding.md §2.4
_P1 = [1 / 8, 1 / 8, 1 / 4, 1 / 2]
_Q1 = [1 / 2, 1 / 4, 1 / 8, 1 / 8]
_P2 = [1 / 2, 1 / 4, 1 / 8, 1 / 8]
_Q2 = [1 / 4] * 4
_P3 = [1 / 4] * 4


def _case(name, pins, drafts, p, q, u_accept, u_sample, greedy=False, logits=None):
    return {"case": name, "pins": pins, "V": len(p[0]), "K": len(drafts), "drafts": list(drafts),
            "q": q, "p": p, "u_accept": u_accept, "u_sample": u_sample, "greedy": greedy,
            "logits": logits}


def dyadic_cases() -> list[dict]:
    """>= 40 RNG-v1 input records with dyadic numbers (R11), covering every rule and edge case.

    Each record: ``{case, pins, V, K, drafts, q (rows or None), p (rows), u_accept, u_sample,
    greedy, logits}`` with Python floats that are exact dyadic rationals, representable in
    float32 too (``decimal.Decimal(x)`` prints the exact decimal string). The first nine are the
    worked cases of docs/speculative-decoding.md §2.4. No expected values: compute them with ``verify_drafts``.
    Every p and q row sums to exactly 1, except rows named "deficit" in ``pins``.
    """
    h20, h21, h24 = 2.0 ** -20, 2.0 ** -21, 2.0 ** -24  # 1 - 2^-24 is the largest float32 below 1
    P, Q = [_P1, _P2, _P3], [_Q1, _Q2]
    c = [
        # docs/speculative-decoding.md §2.4, verbatim
        _case("A", "reject (0.1875 > 0.125); ICDF t=0.25 on cumsum [0,0,.125,.5]", [0, 2], P, Q, [0.375, 0.5], 0.5),
        _case("B", "<= on equality; reject at position 2; u_sample=0 picks the first positive weight",
              [0, 2], P, Q, [0.25, 0.75], 0.0),
        _case("C", "bonus; strict > in ICDF (c[2]=0.75 is not > 0.75)", [1, 3], P, Q, [0.25, 0.25], 0.75),
        _case("C'", "bonus, interior", [1, 3], P, Q, [0.25, 0.25], 0.7),
        _case("D", "p(d)=0 rejected even at u=0", [0, 2], [[0, 1 / 4, 1 / 4, 1 / 2], _P2, _P3], Q, [0.0, 0.5], 0.5),
        _case("E1", "one-hot accept iff u <= p(d)", [2], [_P1, _P2], None, [0.25], 0.2),
        _case("E2", "one-hot residual = p_1 with index 2 zeroed, S=3/4, t=0.15", [2], [_P1, _P2], None, [0.5], 0.2),
        _case("F", "greedy, lowest-index tie-break", [2], [_P1, _P2], None, None, None, True,
              [[2.0, 5.0, 5.0, 1.0], [0.0, 1.0, 2.0, 3.0]]),
        _case("G", "residual all-zero by a rounding deficit of p_1 -> fallback ICDF on p_1",
              [1], [[0.5, 0.5 - h20], [0.5, 0.5]], [[0.5, 0.5]], [1 - h21], 0.75),
        # K = 0: just the bonus
        _case("K0-bonus", "K=0 emits only the bonus; u_sample interior", [], [_P2], None, [], 0.625),
        _case("K0-bonus-u0", "K=0, u_sample=0 -> first positive weight (leading zero skipped)",
              [], [[0, 1 / 2, 1 / 2, 0]], None, [], 0.0),
        _case("K0-greedy", "K=0 greedy -> argmax of the bonus row", [], [_P1], None, None, None, True),
        _case("K0-explicit-q", "K=0 with an empty q", [], [_P3], [], [], 0.25),
        # R2 accept test boundaries
        _case("eq-boundary-accept", "u*q == p exactly -> accept (<=)", [0], [[1 / 4, 3 / 4], [1 / 2, 1 / 2]],
              [[1 / 2, 1 / 2]], [0.5], 0.5),
        _case("eq-boundary-reject", "u*q just above p -> reject; residual [0, 1/4]", [0],
              [[1 / 4, 3 / 4], [1 / 2, 1 / 2]], [[1 / 2, 1 / 2]], [0.5 + 2 ** -10], 0.5),
        _case("ratio-above-1", "p(d) > q(d): accept even at u close to 1", [3], [_P1, _P2], [_Q1], [1 - h24], 0.3125),
        _case("p-equals-q", "p == q: every draft accepted, bonus", [3, 0], [_P1, _P2, _P3], [_P1, _P2],
              [1 - h20, 1 - h21], 0.875),
        _case("p-zero-u-positive", "p(d)=0 with u>0 -> reject", [0], [[0, 1 / 2, 1 / 2, 0], _P2], [_Q2], [0.5], 0.25),
        _case("p-zero-onehot-u0", "one-hot q, p(d)=0, u=0 -> reject (vLLM v1 would accept)", [3],
              [[1 / 2, 1 / 4, 1 / 4, 0], _P3], None, [0.0], 0.5),
        _case("onehot-eq-boundary", "one-hot q, u == p(d) -> accept", [1], [[1 / 4, 1 / 2, 1 / 4], [1 / 2, 0, 1 / 2]],
              None, [0.5], 0.5),
        _case("onehot-pd-1", "one-hot q, p(d)=1 -> accept at any u < 1", [2], [[0, 0, 1], [1 / 4, 1 / 4, 1 / 2]],
              None, [1 - h24], 0.125),
        _case("q-sparse", "q has mass only on the draft (explicit one-hot) == q=None", [2], [_P1, _P2],
              [[0, 0, 1, 0]], [0.5], 0.1875),
        # rejection position and bonus for K = 3
        _case("K3-reject-1", "K=3 reject at position 1", [0, 1, 2], [_P1, _P2, _P3, _P1], [_Q1, _Q2, _Q2],
              [0.5, 0.0, 0.0], 0.125),
        _case("K3-reject-2", "K=3 reject at position 2", [3, 2, 1], [_P1, _P2, _P3, _P1], [_Q1, _Q2, _Q2],
              [0.75, 0.5 + 2 ** -8, 0.0], 0.5),
        _case("K3-reject-3", "K=3 reject at position 3 (last draft)", [3, 0, 1], [_P1, _P2, _P3, _P1],
              [_Q1, _Q2, [1 / 2, 1 / 2, 0, 0]], [0.0, 0.25, 0.75], 0.375),
        _case("K3-bonus", "K=3 all accepted, bonus from the 4th row", [2, 1, 3], [_P1, _P2, _P3, _P1],
              [_Q1, _Q2, _Q2], [0.5, 0.5, 0.5], 0.8125),
        _case("K3-onehot-bonus", "K=3 one-hot, all accepted", [3, 0, 0], [_P1, _P2, _P3, _P2], None,
              [0.5, 0.5, 0.25], 0.5),
        _case("K3-onehot-reject-3", "K=3 one-hot, reject at position 3", [3, 0, 1], [_P1, _P2, _P3, _P2], None,
              [0.25, 0.125, 0.5], 0.5),
        # R5 ICDF edges
        _case("icdf-exact-boundary", "u_sample*S == c[1] exactly -> the next positive index (strict >)", [],
              [[1 / 4, 1 / 4, 0, 1 / 2]], None, [], 0.5),
        _case("icdf-middle-zero", "zero weight between two positives is skipped", [],
              [[1 / 4, 0, 0, 3 / 4]], None, [], 0.25),
        _case("icdf-trailing-zero", "u_sample close to 1: last POSITIVE index, trailing zeros skipped", [],
              [[1 / 2, 1 / 2, 0, 0]], None, [], 1 - h24),
        _case("icdf-leading-zero", "u_sample=0 with leading zeros: first positive index", [],
              [[0, 0, 1 / 4, 3 / 4]], None, [], 0.0),
        _case("icdf-residual-boundary", "residual [0,0,1/8,3/8] (S=1/2), u_sample=1/4: t = c[2] = 1/8 exactly -> token 3",
              [0, 2], P, Q, [0.5, 0.5], 0.25),
        _case("V1", "V=1: the only token is drafted, accepted, and the bonus", [0], [[1.0], [1.0]], [[1.0]], [1 - h20], 0.5),
        _case("V2-last-index", "draft at index V-1, reject, residual picks index 0", [1], [[3 / 4, 1 / 4], [1 / 2, 1 / 2]],
              [[1 / 4, 3 / 4]], [0.5], 1 - 2 ** -10),
        _case("V8-wide", "V=8, K=2, dyadic 1/32 grid", [5, 6],
              [[1 / 32, 3 / 32, 1 / 8, 1 / 16, 3 / 16, 1 / 4, 1 / 8, 1 / 8],
               [1 / 8] * 8, [1 / 16, 1 / 16, 1 / 8, 1 / 8, 1 / 8, 1 / 8, 1 / 8, 1 / 4]],
              [[1 / 8] * 8, [1 / 32, 1 / 32, 1 / 16, 1 / 16, 1 / 8, 1 / 8, 1 / 2, 1 / 16]], [0.75, 0.5], 0.625),
        # R3 residual fallback (rounding deficits)
        _case("fallback-onehot", "one-hot q, p(d)=1-2^-20 (deficit), u above it -> residual empty -> fallback",
              [1], [[0, 1 - h20, 0, 0], _P3], None, [1 - h21], 0.5),
        _case("fallback-pos2", "K=2: accept pos 1, deficit of p_2 at the draft -> fallback at position 2", [2, 1],
              [_P1, [0.5, 0.5 - h20, 0, 0], _P3], [_Q1, [0.5, 0.5, 0, 0]], [0.5, 1 - h21], 0.25),
        _case("fallback-u0", "deficit fallback with u_sample=0 -> first positive index of p_j", [1],
              [[0.5, 0.5 - h20], [0.5, 0.5]], [[0.5, 0.5]], [1 - h21], 0.0),
        # R1 greedy
        _case("greedy-all-accept", "greedy, every draft is the argmax -> bonus argmax", [3, 0],
              [_P1, _P2, _P3], None, None, None, True, [[0, 1, 2, 3], [4, 3, 2, 1], [1, 1, 0, 0]]),
        _case("greedy-mismatch-2", "greedy, mismatch at position 2 emits the argmax there", [3, 1],
              [_P1, _P2, _P3], None, None, None, True, [[0, 1, 2, 3], [4, 3, 2, 1], [0, 0, 0, 0]]),
        _case("greedy-ties-on-p", "greedy without logits: argmax of p, ties -> lowest index", [0],
              [[1 / 4, 1 / 4, 1 / 4, 1 / 4], [1 / 8, 3 / 8, 3 / 8, 1 / 8]], None, None, None, True),
        _case("greedy-neg-inf", "greedy with -inf (masked) logits and a tie at the bonus row", [2],
              [_P1, _P2], None, None, None, True, [[-math.inf, 0.5, 1.5, -2.0], [-math.inf, 7.0, 7.0, 7.0]]),
        _case("greedy-ignores-q-and-u", "greedy ignores q and u (q(d)=0 and u given)", [1],
              [_P1, _P2], [[1, 0, 0, 0]], [1 - 2 ** -10], 1 - 2 ** -10, True, [[0, 2, 1, 0], [1, 0, 0, 0]]),
        _case("greedy-K3", "greedy K=3 mismatch at position 3", [1, 2, 3],
              [_P1, _P2, _P3, _P1], None, None, None, True,
              [[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]]),
    ]
    return copy.deepcopy(c)  # rows are shared above; callers get their own lists


