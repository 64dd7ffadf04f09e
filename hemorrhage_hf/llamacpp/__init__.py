"""GGUF as llama.cpp runs it: the llama.cpp engine (:mod:`.engine`), llama.cpp's own programs (:mod:`.tools`),
GGUF export (:mod:`.export`) and llama-perplexity's figures read back (:mod:`.perplexity`)."""
