"""Noise-aware choice of a search's winner: :func:`select`, :class:`Selection`, :func:`standard_error`.

A candidate's score is its accuracy (percent) on ``n`` validation images, a binomial estimate
``p = k / n`` whose standard error is taken as Agresti and Coull's "plus four" one (1998): two
hits and two misses added, ``100 * sqrt(q (1 - q) / (n + 4))`` with ``q = (k + 2) / (n + 4)``.
On val200 near 75 % that is 3.1 points, so candidates a point or two apart are not told apart by
the evaluation; unlike the plain ``sqrt(p (1 - p) / n)``, it does not vanish at 100 % (0.69
points on 200 images: 199 of 200 is not told apart from 200 of 200 either).
Every candidate within ``tie_se`` standard errors of the top score is *tied* with it; the rule
``search.ties`` (:data:`TIE_BREAKS`) picks the winner among them: ``best`` the top score (NOAH's
choice; fewer parameters on equal scores), ``more_params`` the one with the most parameters
(under the limit, as every candidate is), ``fewer_params`` the fewest.  The s.e. is the top
candidate's; it is unknown (no ties) when its evaluation did not say how many images it scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from noah_ray.evolution.candidate import DONE, Candidate, rank_key

#: ``search.ties`` rules: the sort key whose minimum among the tied candidates wins
TIE_BREAKS: dict[str, Callable[[Candidate], tuple[Any, ...]]] = {
    "more_params": lambda c: (-c.params, -cast(float, c.score), c.cid),
    "fewer_params": lambda c: (c.params, -cast(float, c.score), c.cid),
    "best": rank_key,
}


def standard_error(acc_percent: float, n: int) -> float:
    """Standard error (points) of an accuracy of ``acc_percent`` % measured on ``n`` images: the
    binomial one with two hits and two misses added (Agresti-Coull, module docstring)."""
    p = min(max(acc_percent / 100.0, 0.0), 1.0)
    q = (p * n + 2.0) / (n + 4.0)
    return 100.0 * math.sqrt(q * (1.0 - q) / (n + 4.0))


def hits_hex(correct: Sequence[bool]) -> str:
    """One bit per image (1: right), the first image in the high bit of the first byte, as hex."""
    out = bytearray((len(correct) + 7) // 8)
    for i, ok in enumerate(correct):
        if ok:
            out[i // 8] |= 0x80 >> (i % 8)
    return out.hex()


@dataclass(frozen=True)
class Paired:
    """McNemar's exact one-sided test of "the first model is better" on ``n`` shared images: ``b``
    images only the first got right, ``c`` only the second, ``p`` = P(Binomial(b + c, 1/2) >= b)."""

    n: int
    b: int
    c: int
    p: float


def paired_test(first: str, second: str, n: int) -> Paired:
    """:class:`Paired` of two :func:`hits_hex` records of the same ``n`` images (in the same order)."""
    size = 2 * ((n + 7) // 8)
    if len(first) != size or len(second) != size:
        raise ValueError(f"paired records of {len(first) // 2} and {len(second) // 2} bytes do not both hold "
                         f"{n} images")
    x, y = int(first or "0", 16), int(second or "0", 16)
    b, c = (x & ~y).bit_count(), (y & ~x).bit_count()
    return Paired(n, b, c, binomial_tail(b, b + c))


def binomial_tail(k: int, m: int) -> float:
    """P(X >= k) for X ~ Binomial(m, 1/2) (1.0 for k <= 0), summed in log space."""
    if k <= 0:
        return 1.0
    log_half = m * math.log(0.5)
    terms = [math.lgamma(m + 1) - math.lgamma(j + 1) - math.lgamma(m - j + 1) + log_half for j in range(k, m + 1)]
    return min(1.0, sum(math.exp(t) for t in terms))


def tie_floor(best: float, se: float | None, tie_se: float = 1.0) -> float:
    """The lowest score tied with ``best``: ``tie_se`` standard errors ``se`` (points) below it
    (None: unknown, only equal scores are tied), less a float tolerance."""
    return best - (tie_se * se if se is not None else 0.0) - 1e-9


@dataclass(frozen=True)
class Selection:
    """The winner of a search and the evidence: ``top`` (highest score), ``se`` (its s.e., points;
    None: unknown), ``n`` (images it was scored on), ``tied`` (candidates within ``tie_se`` s.e.
    of the top, the top included, best score first) and the ``rule`` that picked ``winner``."""

    winner: Candidate
    top: Candidate
    se: float | None
    n: int | None
    tied: tuple[Candidate, ...]
    rule: str
    tie_se: float

    @property
    def others_tied(self) -> int:
        """How many other candidates were statistically tied with the winner."""
        return len(self.tied) - 1

    def summary(self) -> dict[str, Any]:
        """JSON-ready fields (the search result, ``best_subnet.yaml``'s header, the tracking run)."""
        return {"ties": self.rule, "tie_se": self.tie_se, "top_cid": self.top.cid, "top_val_acc": self.top.score,
                "val_se": self.se, "val_images": self.n, "tied": self.others_tied,
                "tied_cids": [c.cid for c in self.tied], "winner_cid": self.winner.cid}

    def line(self) -> str:
        """One line: the s.e. and how many candidates were tied with the winner."""
        if self.se is None:
            return f"s.e. unknown (images scored not recorded): winner = top score ({self.rule})"
        return (f"{self.others_tied} other candidate(s) within {self.tie_se:g} s.e. ({self.tie_se * self.se:.2f} "
                f"points; s.e. {self.se:.2f} on {self.n} images) of the top score {self.top.score:.2f} "
                f"({self.top.cid}); {self.rule}: {self.winner.cid}, {self.winner.score:.2f}, "
                f"{self.winner.params} params")


def select(cands: Sequence[Candidate], rule: str = "best", tie_se: float = 1.0) -> Selection | None:
    """The winner among the scored ``cands`` under ``rule`` (:data:`TIE_BREAKS`); None if none scored.
    Scores are accuracies in percent; ``info["val_images"]`` is the number of images scored."""
    scored = sorted((c for c in cands if c.status == DONE), key=rank_key)
    if not scored:
        return None
    top = scored[0]
    n = top.info.get("val_images")
    se = standard_error(cast(float, top.score), n) if isinstance(n, int) and n > 0 else None
    floor = tie_floor(cast(float, top.score), se, tie_se)
    tied = tuple(c for c in scored if cast(float, c.score) >= floor)
    winner = min(tied, key=TIE_BREAKS[rule])
    return Selection(winner, top, se, n if se is not None else None, tied, rule, tie_se)
