"""The stages of the flow, in order: each reads its config slice, caches its result under
:mod:`edgefm.artifacts` and builds only on earlier stages (a test holds the order).

``data`` (:mod:`edgefm.data`) -> :mod:`~edgefm.stages.pretrain` (the MAE) ->
:mod:`~edgefm.stages.finetune` (model A) -> :mod:`~edgefm.stages.feasibility` (what A is worth) ->
:mod:`~edgefm.stages.measuring` (A timed) -> :mod:`~edgefm.stages.quantization` (A in INT8) ->
:mod:`~edgefm.stages.smaller` (model B) -> :mod:`~edgefm.stages.peer` (what a practitioner would
train instead) -> :mod:`~edgefm.stages.deploy` (model C, its bundle, the final benchmark).
"""

ORDER = ("pretrain", "finetune", "feasibility", "measuring", "quantization", "smaller", "peer", "deploy")
