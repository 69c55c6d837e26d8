"""What people run around the compiler: the CLI (:mod:`.cli`), the demo (:mod:`.demo`), the packaged
models (:mod:`.models`), WikiText-2 (:mod:`.data`) and perplexity (:mod:`.eval`)."""
