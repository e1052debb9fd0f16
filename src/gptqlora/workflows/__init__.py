"""The multi-stage jobs the commands are made of, each a function of explicit arguments run in a ``RunContext``:

- ``base``: check and load a quantized base, quantize a loaded model, prepare a run's base (``--quantized``, the
  run's own on ``--resume``, or ``--model`` quantized now);
- ``quantize``: a float model into a GPTQ directory, streamed from safetensors or in memory;
- ``training``: the training corpus and its split, LoRA trained over a base;
- ``scored``: check, load and evaluate the model a command scores (base, adapter, verifier as reranker);
- ``sample``: labelled samples for a verifier;
- ``verifier``: a verifier trained on them;
- ``pipeline``: the whole job's bookkeeping (settings, rows, results table) and its verifier stage.

Commands import these and never each other (ARCHITECTURE.md: layer 6, beside ``gptqlora.context``).
"""
