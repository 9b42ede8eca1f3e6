def test_placeholder():
    import engines.lora_stack as ls
    assert ls.LoraStack().active() == ()
