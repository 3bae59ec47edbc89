# Thin aliases for ./dev, which does the work (and needs no make).
.PHONY: demo test check bench
demo:
	./dev demo
test:
	./dev test
check:
	./dev check
bench:
	./dev bench
