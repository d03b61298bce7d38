"""Evaluation: in-training evals and evaluators, few-shot ridge, saved-run eval/predict."""
