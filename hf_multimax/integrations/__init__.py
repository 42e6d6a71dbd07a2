"""Glue to other libraries, one module each: Transformers' hooks (:mod:`.transformers`), Trainer
(:mod:`.trainer`) and PEFT (:mod:`.peft`). Importing this package imports none of them."""
