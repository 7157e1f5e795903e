"""The pipeline's report: report.md and report.html with PNG plots, headline figures, sample
answers side by side, and a few plain sentences on what each stage did.

    figures.py  the numbers, from each stage's metrics.jsonl and evaluation.json
    prose.py    the sentences: who ranked, the rule, what each stage did
    write.py    the plots, then report.md, report.html and headline.json

The pipeline imports the report; the report imports no stage and not the pipeline.
"""
from llmtrain.report.figures import headline, method_dir, methods_of, methods_table, ranking_sources
from llmtrain.report.prose import rule_sentence, sources_sentence
from llmtrain.report.write import md_text, write_report

__all__ = ["headline", "md_text", "method_dir", "methods_of", "methods_table", "ranking_sources", "rule_sentence",
           "sources_sentence", "write_report"]
