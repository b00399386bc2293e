"""Local lm-evaluation-harness tasks that run offline (YAML + small JSONL data next to them, loaded by utils.py).

molm_choice (multiple choice, loglikelihood), molm_qa (generate_until, exact match) and molm_text
(loglikelihood_rolling, wikitext's word/byte perplexity), grouped under the tag `molm_local`. Pass this directory as
lm_eval's --include_path.
"""
