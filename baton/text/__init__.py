"""Text in and out of token ids, without torch: tokenizer, chat template, incremental detokenizer.

Shared by the engine and the router (which must stay torch-free): both read the same tokenizer folder
(``tokenizer.json`` + ``tokenizer_config.json``), so the ids the router hashes are the ids the engine runs.
"""

from baton.text.chat_template import ChatTemplateError, render_chat_template
from baton.text.detokenizer import IncrementalDetokenizer
from baton.text.tokenizer import Tokenizer

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "Tokenizer", "render_chat_template"]
