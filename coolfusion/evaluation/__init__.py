"""Evaluation tooling for the Cool-Fusion coolfusion.server: `coolfusion eval` / `python -m coolfusion.evaluation`.

tasks.py   data files -> items, prompts (from coolfusion/evaluation/prompts/*.yaml), scoring
metrics.py answer extraction and metrics (GSM8K last number, LAMBADA first word, SQuAD EM/F1)
runner.py  requests through the OpenAI API, resumable results JSONL, answer perplexity
report.py  side-by-side table (markdown + JSON) and bar chart PNG
cli.py     the command line (add_arguments / run)
"""
