"""A trained verifier (outcome value model, after Cobbe et al. 2021 and OVM): it reads a question and one sampled
solution and predicts, at every solution token, whether that solution ends with the right answer.

- ``model``: the verifier itself (a LoRA-adapted quantized base plus a scalar value head), its input encoding and
  its files.
- ``load``: loading one onto its base and scoring solutions; ``VerifierRerank`` is the reranker ``gptqlora eval``
  receives (evaluation never imports this package).
- ``samples``: labelled samples from the train split (``gptqlora sample``), appended per batch and resumable.
- ``train``: the token-level loss and the training loop (``gptqlora train-verifier``).

Test-split gold never reaches training: ``samples`` refuses the test split and ``train`` refuses a samples
directory that is not labelled as train, or that holds a test question.
"""
