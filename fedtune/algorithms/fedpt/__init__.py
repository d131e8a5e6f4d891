"""FedPT (Gao et al., arXiv 2410.00362): federated proxy-tuning of a black-box large LM.

proxy.py (s_large + α (s_tuned − s_base), three-cache decoding), distill.py (teacher → student
KL on server-held prompts), evaluate.py (Rouge-L and loss of the proxy-tuned model), product.py
(the exported proxy-tuned model), config.py, algorithm.py (the engine-facing glue wrapping the
device trainer).
"""
