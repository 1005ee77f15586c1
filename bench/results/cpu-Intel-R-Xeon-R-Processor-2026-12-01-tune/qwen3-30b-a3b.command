build/moegen tune specs/qwen3-30b-a3b.yaml --tokens 1,16,128,1024 --budget 420 --out tuning
