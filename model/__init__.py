"""model/: our BERT, our AdamW, the single-task classifier and the multitask trainer."""
