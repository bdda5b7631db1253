"""Pretraining data prepared once, outside the training job: token shards on disk
(``shards``), the ``bigbatch prepare-data`` job that writes them (``prepare``, inputs read by
``sources``), and the weighted sample order over several prepared sources (``mixture``)."""
