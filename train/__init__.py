"""tadsr.train"""
