"""The pieces every layer shares: settings (``config``), the sampling and resampling math (the
kernels' torch twins reuse it: one definition) and the result records (``result``)."""
