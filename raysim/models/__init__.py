"""Models: the Hugging Face causal LMs devices fine-tune, and the fast paths that train them.

:mod:`~raysim.models.build` makes the base model and its starting weights (from scratch, from a checkpoint, or
pre-trained centrally on public text by :mod:`~raysim.models.pretrain`); :mod:`~raysim.models.architectures`
says where each family (GPT-2, Llama-style) keeps its blocks, projections and embeddings, which is all a method
needs to cut it. :mod:`~raysim.models.fastops` and :mod:`~raysim.models.grouped` compute the same training step
with fewer passes over memory: fused kernels, and several devices' steps in one forward and backward pass.
"""
