"""CLIP's image normalisation constants (OpenAI CLIP; transformers' `CLIPImageProcessor` defaults).

Their only definition: a module without JAX or flax imports, so that grain worker processes (the data
pipeline) and the exporters can use them without loading the models.
"""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
