"""The pieces of ``train.py``: typed run config (``config``), text sources (``corpus``),
tokenizers (``tokenizer``), packed token blocks and the global sample order (``data``), models from
configs (``model``), plan -> DeepSpeed engine (``engine``), process group (``distributed``) and run
outputs (``metrics``). Flow: file/CLI -> RunConfig -> builders -> engine -> loop."""

from bigbatch.logs import quiet_third_party

quiet_third_party()  # before any submodule imports DeepSpeed
