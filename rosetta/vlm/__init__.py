"""Vision-language tasks beyond the model itself: the commands (`rosetta caption`, `ask`, `extract`)."""
