"""tadsr.runtime"""
