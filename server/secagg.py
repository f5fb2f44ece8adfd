"""Secure aggregation (issue #26): Flower's SecAgg+ protocol driven inside this project's round loop.

Why not ``flwr.server.workflow.SecAggPlusWorkflow`` itself: it runs one round of the *legacy*
strategy API (``LegacyContext``, ``configure_fit`` / ``aggregate_fit``, ``FitRes``) and owns the
whole round, while a round here is the project's (stage weights, the VAE on request, retries,
checkpoints, per-site rows, FedAdam's server step). So the four protocol stages are driven here,
message by message over the Grid, against Flower's unmodified client side,
``flwr.client.mod.secaggplus_mod`` (wrapped by :mod:`client.secagg_mod`). Every cryptographic step
is Flower's: key agreement (``generate_shared_key``), Shamir shares (``combine_shares``), the mask
generator (``pseudo_rand_gen``), quantization (``dequantize``), the modular arithmetic and the
stage/key names. What this module adds is bookkeeping and checks: every reply is a participant's
word, so its keys, lists and vectors are type-, size- and range-checked before use (a bad one is
treated as a dropout); only the nodes that shared their keys count as dropped (a node lost at
setup left no shares to ask for); the weights' sum that unmasking reveals is checked against the
sites' plain counts.

Every site neighbours every other (SecAgg+ with ``num_shares`` = all sites, i.e. SecAgg): a
federation of hospitals is tens of sites at most, where the sparse graph saves nothing worth its
weaker dropout tolerance. The server learns the weighted sum of the sites' quantized updates, the
sum of their weights, and who answered each stage; nothing else of one site's update unless it
colludes with ``threshold`` sites or more (docs/PRIVACY.md).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import bytes_to_ndarray

from .flower_compat import (
    RECORD_KEY_CONFIGS, Key, Stage, bytes_to_private_key, bytes_to_public_key, combine_shares, dequantize,
    factor_extract, generate_shared_key, parameters_addition, parameters_mod, parameters_subtraction, pseudo_rand_gen,
)
from .replies import node_of, sent_to

log = logging.getLogger("flwr.addiff")

MODULUS = 2 ** 32  # Flower's mask range (its largest; a power of two)
MAX_KEY_BYTES = 1024  # a PEM public key of Flower's curve is ~215 bytes
MAX_CIPHERTEXT_BYTES = 4096  # two Shamir shares of 32-byte secrets, encrypted


class SecAggError(RuntimeError):
    """The secure round cannot complete (too few sites left, shares missing, sums inconsistent)."""


@dataclass(frozen=True)
class SecAggParams:
    """The protocol's numbers. ``clip``: Flower's clipping range of a site's weighted update per
    element; ``quantization``: its integer levels over [-clip, clip]; ``max_weight``: a site's
    example count is divided by it before weighting; ``threshold``: shares needed to unmask."""

    clip: float
    quantization: int
    max_weight: float
    threshold: int


def majority(n: int) -> int:
    """The default reconstruction threshold: a strict majority of the round's sites, at least 2."""
    return max(2, n // 2 + 1)


def weight_ratio(num_examples: float, max_weight: float, quantization: int) -> int:
    """The integer weight a site's masked vector carries (as Flower's mod rounds it)."""
    return round(float(num_examples) / float(max_weight) * quantization)


def error_bound(params: SecAggParams, ratios: list[int]) -> float:
    """Largest error per element of the unmasked weighted mean vs the exact mean with the same
    integer weights: each site's stochastic rounding errs by less than one step 2 clip / Q, the
    mean divides the sum of ``k`` such errors by the weights' sum ``sum(ratios) / Q``."""
    step = 2.0 * params.clip / params.quantization
    total = sum(ratios) / params.quantization
    return len(ratios) * step / total if total > 0 else float("inf")


@dataclass
class _State:
    nodes: list[int]
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # node -> (pk1, pk2)
    sharing: list[int] = field(default_factory=list)  # nodes whose key shares went out
    forward: dict[int, tuple[list[int], list[bytes]]] = field(default_factory=dict)  # dst -> (srcs, ciphertexts)
    vectors: dict[int, list[np.ndarray]] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)  # node -> protocol stage it dropped at
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage: messages out to replies in


def _config_bytes(record: ConfigRecord | None) -> int:
    """Bytes of the keys, shares and vectors a ConfigRecord carries (what the protocol adds)."""
    total = 0
    for v in (record or {}).values():
        for x in (v if isinstance(v, list) else [v]):
            total += len(x) if isinstance(x, (bytes, str)) else 8
    return total


class SecAggRound:
    """One secure round over ``send`` (the round loop's send-and-receive with its timeout).

    Use: ``setup()``, ``share_keys()``, ``collect(messages)`` (the project's train messages, one
    per node; returns the replies, masked vectors set aside), then ``unmask(accepted, shapes)``
    with the nodes whose vectors the caller accepted; each stage raises :class:`SecAggError`
    when fewer than ``threshold`` sites are left."""

    def __init__(self, send: Callable[[list[Message]], list[Message]], nodes: list[int], params: SecAggParams,
                 group_id: str = ""):
        self.send = send
        self.params = params
        self.group_id = group_id
        self.state = _State(nodes=sorted(nodes))
        if len(self.state.nodes) * params.quantization >= MODULUS:
            raise SecAggError(f"{len(nodes)} sites x secagg-quantization {params.quantization} reach the mask "
                              f"range 2^32: the sum would overflow (lower secagg-quantization)")

    # -- messaging ------------------------------------------------------------------------------
    def _exchange(self, contents: dict[int, RecordDict], stage: str) -> dict[int, Message]:
        t0 = time.perf_counter()
        try:
            return self._exchange_timed(contents, stage)
        finally:
            self.state.seconds[stage] = self.state.seconds.get(stage, 0.0) + time.perf_counter() - t0

    def _exchange_timed(self, contents: dict[int, RecordDict], stage: str) -> dict[int, Message]:
        msgs = [Message(content=c, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=self.group_id)
                for nid, c in contents.items()]
        for m in msgs:
            self.state.bytes_down[m.metadata.dst_node_id] = self.state.bytes_down.get(m.metadata.dst_node_id, 0) + \
                _config_bytes(m.content.config_records.get(RECORD_KEY_CONFIGS))
        replies = self.send(msgs)
        sent = sent_to(msgs)
        out: dict[int, Message] = {}
        for r in replies:
            nid = node_of(r, sent)
            if nid in contents and nid not in out:
                out[nid] = r
                if not r.has_error():
                    self.state.bytes_up[nid] = self.state.bytes_up.get(nid, 0) + \
                        _config_bytes(r.content.config_records.get(RECORD_KEY_CONFIGS))
        for nid in contents:
            if nid not in out or out[nid].has_error():
                self._drop(nid, stage)
        return {nid: r for nid, r in out.items() if not r.has_error()}

    def _drop(self, nid: int, stage: str) -> None:
        self.state.dropped.setdefault(nid, stage)

    def _alive(self, stage: str) -> list[int]:
        alive = [n for n in self.state.nodes if n not in self.state.dropped]
        if len(alive) < self.params.threshold:
            raise SecAggError(f"secure aggregation: {len(alive)} site(s) left after its {stage} stage, fewer than "
                              f"the reconstruction threshold {self.params.threshold}")
        return alive

    @staticmethod
    def _configs(reply: Message) -> ConfigRecord | None:
        return reply.content.config_records.get(RECORD_KEY_CONFIGS)

    # -- stage 0: setup -------------------------------------------------------------------------
    def setup(self) -> None:
        p, n = self.params, len(self.state.nodes)
        cfg = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: n, Key.THRESHOLD: int(p.threshold),
               Key.CLIPPING_RANGE: float(p.clip), Key.TARGET_RANGE: int(p.quantization), Key.MOD_RANGE: MODULUS,
               Key.MAX_WEIGHT: float(p.max_weight)}
        got = self._exchange({nid: RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(dict(cfg))})
                              for nid in self.state.nodes}, Stage.SETUP)
        seen: dict[bytes, int] = {}
        for nid, r in got.items():
            c = self._configs(r)
            pk = tuple(c.get(k) for k in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2)) if c is not None else (None, None)
            if not all(isinstance(k, bytes) and 0 < len(k) <= MAX_KEY_BYTES for k in pk) or pk[0] == pk[1]:
                self._drop(nid, Stage.SETUP)
                continue
            self.state.keys[nid] = (pk[0], pk[1])
            for k in pk:
                seen.setdefault(k, nid)
        # a key two nodes claim belongs to neither (Flower's mod would refuse the whole set)
        for nid, pk in list(self.state.keys.items()):
            if any(seen[k] != nid for k in pk):
                self.state.keys.pop(nid)
                self._drop(nid, Stage.SETUP)
        self._alive(Stage.SETUP)

    # -- stage 1: share keys --------------------------------------------------------------------
    def share_keys(self) -> None:
        alive = self._alive(Stage.SETUP)
        table = {str(nid): list(self.state.keys[nid]) for nid in alive}
        got = self._exchange({nid: RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({**table, Key.STAGE: Stage.SHARE_KEYS})})
                              for nid in alive}, Stage.SHARE_KEYS)
        forward: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in alive}
        for src, r in sorted(got.items()):
            c = self._configs(r)
            dsts = c.get(Key.DESTINATION_LIST) if c is not None else None
            ctxts = c.get(Key.CIPHERTEXT_LIST) if c is not None else None
            others = set(alive) - {src}
            ok = (isinstance(dsts, list) and isinstance(ctxts, list) and len(dsts) == len(ctxts)
                  and all(type(d) is int for d in dsts) and set(dsts) == others and len(set(dsts)) == len(dsts)
                  and all(isinstance(x, bytes) and 0 < len(x) <= MAX_CIPHERTEXT_BYTES for x in ctxts))
            if not ok:  # it must share with every other site, once
                self._drop(src, Stage.SHARE_KEYS)
                continue
            for dst, ct in zip(dsts, ctxts):
                forward[dst][0].append(src)
                forward[dst][1].append(ct)
        sharing = self._alive(Stage.SHARE_KEYS)
        # only the shares of nodes that shared with everyone still here travel on
        self.state.forward = {d: ([s for s in srcs if s in sharing], [c for s, c in zip(srcs, cts) if s in sharing])
                              for d, (srcs, cts) in forward.items() if d in sharing}
        self.state.sharing = sharing

    # -- stage 2: collect masked vectors (the sites train here) ---------------------------------
    def collect(self, messages: dict[int, Message], shapes: list[tuple[int, ...]]) -> dict[int, Message]:
        """Send each sharing node its train message plus the key shares addressed to it. Returns
        every reply that is not a Flower error (a site's failure or refusal reply included); the
        masked vector of each is checked against ``shapes`` (the factor first) and set aside."""
        contents = {}
        for nid in self.state.sharing:
            srcs, cts = self.state.forward[nid]
            content = RecordDict(dict(messages[nid].content.items()))
            content[RECORD_KEY_CONFIGS] = ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                                                        Key.CIPHERTEXT_LIST: cts, Key.SOURCE_LIST: srcs})
            contents[nid] = content
        got = self._exchange(contents, Stage.COLLECT_MASKED_VECTORS)
        for nid, r in got.items():
            vec = self._vector(r, shapes)
            if vec is None:
                self._drop(nid, Stage.COLLECT_MASKED_VECTORS)
            else:
                self.state.vectors[nid] = vec
            if RECORD_KEY_CONFIGS in r.content.config_records:  # never kept beside the site's reply
                del r.content.config_records[RECORD_KEY_CONFIGS]
        return got

    def _vector(self, reply: Message, shapes: list[tuple[int, ...]]) -> list[np.ndarray] | None:
        c = self._configs(reply)
        raw = c.get(Key.MASKED_PARAMETERS) if c is not None else None
        if not isinstance(raw, list) or len(raw) != len(shapes) or not all(isinstance(b, bytes) for b in raw):
            return None
        try:
            arrays = [bytes_to_ndarray(b) for b in raw]
        except (ValueError, OSError, EOFError):
            return None
        for a, shape in zip(arrays, shapes):
            if a.dtype.kind not in "iu" or tuple(a.shape) != tuple(shape) or (a.size and (a.min() < 0 or a.max() >= MODULUS)):
                return None
        return [a.astype(np.int64) for a in arrays]

    # -- stage 3: unmask ------------------------------------------------------------------------
    def unmask(self, accepted: list[int]) -> tuple[int, list[np.ndarray]]:
        """Unmask the sum of the ``accepted`` nodes' vectors: (the integer weights' sum, the
        weighted mean as float64 arrays). The other nodes that shared keys count as dropped: their
        pairwise masks are rebuilt from their secret key's shares, never their own mask."""
        p = self.params
        active = sorted(n for n in accepted if n in self.state.vectors)
        for nid in self.state.sharing:
            if nid not in active:
                self._drop(nid, Stage.COLLECT_MASKED_VECTORS)
        if len(active) < p.threshold:
            raise SecAggError(f"secure aggregation: {len(active)} masked update(s) usable, fewer than the "
                              f"reconstruction threshold {p.threshold}")
        dead = [n for n in self.state.sharing if n not in active]
        cfg = {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead}
        got = self._exchange({nid: RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(dict(cfg))}) for nid in active},
                             Stage.UNMASK)
        shares: dict[int, list[bytes]] = {nid: [] for nid in active + dead}
        for nid, r in got.items():
            c = self._configs(r)
            nids = c.get(Key.NODE_ID_LIST) if c is not None else None
            got_shares = c.get(Key.SHARE_LIST) if c is not None else None
            if not (isinstance(nids, list) and isinstance(got_shares, list) and len(nids) == len(got_shares)
                    and sorted(nids) == sorted(active + dead)
                    and all(isinstance(s, bytes) and 0 < len(s) <= MAX_CIPHERTEXT_BYTES for s in got_shares)):
                continue  # a malformed answer gives no share (its vector is in the sum already)
            for owner, share in zip(nids, got_shares):
                shares[owner].append(share)
        total = None
        for nid in active:
            total = self.state.vectors[nid] if total is None else parameters_addition(total, self.state.vectors[nid])
        assert total is not None
        for owner, owner_shares in shares.items():
            if len(owner_shares) < p.threshold:
                raise SecAggError(f"secure aggregation: {len(owner_shares)} share(s) of a site's secret came back, "
                                  f"fewer than the reconstruction threshold {p.threshold}")
            total = self._remove_masks(total, owner, combine_shares(owner_shares), owner in active, active)
        total = parameters_mod(total, MODULUS)
        weights, summed = factor_extract(total)
        weights = int(weights)
        if weights <= 0:
            raise SecAggError("secure aggregation: the unmasked weights sum to zero")
        mean = dequantize(summed, p.clip, p.quantization)
        offset = -(len(active) - 1) * p.clip  # each of the k vectors was shifted by +clip
        mean = [(a + offset) * (p.quantization / weights) for a in mean]
        return weights, mean

    def _remove_masks(self, total: list[np.ndarray], owner: int, secret: bytes, is_active: bool,
                      active: list[int]) -> list[np.ndarray]:
        shapes = [a.shape for a in total]
        if is_active:  # its private mask, from its seed
            return parameters_subtraction(total, pseudo_rand_gen(secret, MODULUS, shapes))
        sk1 = bytes_to_private_key(secret)  # a dropped node: its pairwise masks with the nodes in the sum
        for other in active:
            mask = pseudo_rand_gen(generate_shared_key(sk1, bytes_to_public_key(self.state.keys[other][0])),
                                   MODULUS, shapes)
            # ``other`` added +mask when other > owner, -mask otherwise (Flower's mod): cancel it
            total = parameters_subtraction(total, mask) if other > owner else parameters_addition(total, mask)
        return total

    # -- what the round records -----------------------------------------------------------------
    @property
    def dropped(self) -> dict[int, str]:
        return dict(self.state.dropped)

    @property
    def bytes_up(self) -> dict[int, int]:
        return dict(self.state.bytes_up)

    @property
    def bytes_down(self) -> dict[int, int]:
        return dict(self.state.bytes_down)

    @property
    def seconds(self) -> dict[str, float]:
        return dict(self.state.seconds)
