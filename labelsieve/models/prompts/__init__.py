"""Prompt learning on an open_clip CLIP model, one module per kind.

* :class:`TextTower` runs the text side of a CLIP model on token *embeddings*, so that learnable
  context vectors can stand in for words; fed the model's own token embeddings it reproduces
  ``model.encode_text`` exactly. It can also replace the context slots at deeper layers (MaPLe).
* :class:`DualPromptLearner` is CoOp with two shared contexts, positive and negative, as used by DEFT
  (Wei et al., NeurIPS 2024): ``[SOT] ctx_1 … ctx_n <class name> . [EOT]``.
* :class:`PromptedViT` runs an open_clip :class:`~open_clip.transformer.VisionTransformer` with extra
  prompt tokens inserted after the class token, optionally replaced at every block (VPT deep, MaPLe);
  with no prompts it reproduces ``model.encode_image`` exactly.
* :class:`MaPLePrompts` is MaPLe (Khattak et al., CVPR 2023), the prompts of AVL-Prompter's co-divide:
  shared deep vision-language prompts whose vision half is a linear function of the text half.

The CLIP model's own weights are never registered as sub-modules of the prompt learners, so a learner's
``state_dict()`` holds only what it learns (see each class); the learners freeze the CLIP weights they
run through (``requires_grad=False``), as CoOp and MaPLe do.
"""


from labelsieve.models.prompts.coop import DualPromptLearner
from labelsieve.models.prompts.maple import MaPLeOutput, MaPLePrompts
from labelsieve.models.prompts.text_tower import TextTower
from labelsieve.models.prompts.vit import PromptedViT, is_open_clip_vit, vit_forward

__all__ = ["DualPromptLearner", "MaPLeOutput", "MaPLePrompts", "PromptedViT", "TextTower", "is_open_clip_vit",
           "vit_forward"]
