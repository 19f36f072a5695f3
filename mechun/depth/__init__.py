"""The unlearning depth card: which parts of the forgotten knowledge look *removed*, and which only *hidden*?

One card for any (base, unlearned) pair, whatever method made it (RMU, localized fine-tuning, gradient ascent, an
inference-time SAE intervention). Every section is a separate test of "is the knowledge really gone?":

=================  =============================================================================================
section            what it measures
=================  =============================================================================================
behaviour          forget-domain accuracy in every format (trained templates, held-out paraphrases, MCQ in fresh
                   option orders, MCQ over all 24 orders on the questions the base model knows robustly)
junk               project the mean (unlearned − base) direction out from its peak layer on; how much forget
                   accuracy returns (the RMU-is-shallow test, :func:`mechun.junk.junk_recovery`), with a
                   random-direction control
probes             held-out-subject linear probes at the last token, per layer: is the attribute still decodable?
relearning         fine-tune on half the forgotten facts for k steps; accuracy on the *other* half (never trained
                   after unlearning: anything above the unlearned level was hidden, not removed)
cka                linear CKA between base and unlearned activations, per layer, on forget and retain prompts
specificity        the neighbourhood: retain accuracy and NKL (true KL, nats) on retain prompts, static and with a
                   forget-domain sentence prepended (CounterFact+'s dynamic form: does forget content in context
                   break unrelated recall?). Unlearning removes a whole domain, so every other subject of a forget
                   relation is forgotten too; the retain domains are the neighbourhood that must stay intact
=================  =============================================================================================

The package is split so that no module mixes measuring with drawing: :mod:`~mechun.depth.card` (the typed card,
JSON in and out, seed aggregation), :mod:`~mechun.depth.measure` (the measurements), :mod:`~mechun.depth.verdict`
(the rules) and :mod:`~mechun.depth.report` (figures, ``card.json`` and ``report.html``).

Beyond the card: :func:`~mechun.depth.uds.unlearning_depth_score` (UDS, for a full / retain / unlearned triple)
and :mod:`~mechun.depth.benchmark` (every measure scored against relearning beyond the retain oracle).

Nothing here changes either model's weights: relearning runs on a fresh copy the caller provides.
"""

from mechun.depth.card import (
    Behaviour,
    CKASection,
    DepthCard,
    FormatAccuracy,
    JunkSection,
    McqAllOrders,
    ProbeSection,
    RelearningSection,
    SeedMeanCard,
    Skipped,
    Specificity,
    Verdict,
    aggregate_cards,
    summary_row,
)
from mechun.depth.measure import DepthConfig, depth_card, mcq_depth_card
from mechun.depth.report import card_blocks, write_card
from mechun.depth.uds import UDSResult, unlearning_depth_score
from mechun.depth.verdict import HIDDEN, MIN_FORGOTTEN, REMOVED, verdict

__all__ = [
    "HIDDEN", "MIN_FORGOTTEN", "REMOVED", "Behaviour", "CKASection", "DepthCard", "DepthConfig", "FormatAccuracy",
    "JunkSection", "McqAllOrders", "ProbeSection", "RelearningSection", "SeedMeanCard", "Skipped", "Specificity",
    "Verdict", "aggregate_cards", "card_blocks", "depth_card", "mcq_depth_card", "summary_row", "verdict",
    "write_card", "UDSResult", "unlearning_depth_score",
]
