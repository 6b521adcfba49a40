"""Task distillation (the paper's second step): the fine-tuning loop the run_*_w_distillation.py command lines
share, loading task models, evaluation over ranks, and the GLUE, SQuAD and NER data with their metrics."""
