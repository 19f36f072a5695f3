"""mechun: the mechanistic study of unlearning and editing in language models.

Quick start::

    import mechun
    model = mechun.load_model("runs/organism")            # a local HF checkpoint dir or a hub name
    cache = mechun.cache_residuals(model, [p.text for p in world.prompts("pathogen")], layers=[2, 3])
    with mechun.project_out(model, direction, layers=[3, 4, 5]):
        print(mechun.evaluate_world(model, world))
"""

from mechun.cache import ResidualCache, cache_residuals
from mechun.errors import MechunError, ModelMismatchError
from mechun.evaluate import answer_correct, answer_logprob, evaluate_world, mcq_correct
from mechun.hooks import count_hooks, hooks
from mechun.interventions import Direction, add_direction, project_out
from mechun.models import load_model, model_fingerprint, save_model, tokenize, wrap_model
from mechun.organism.world import World

__all__ = [
    "Direction", "MechunError", "ModelMismatchError", "ResidualCache", "World", "add_direction",
    "answer_correct", "answer_logprob", "cache_residuals", "count_hooks", "evaluate_world", "hooks",
    "load_model", "mcq_correct", "model_fingerprint", "project_out", "save_model", "tokenize", "wrap_model",
]
__version__ = "0.1.0"
