"""tadsr.quantize"""
