build/moegen tune specs/qwen1.5-moe-a2.7b.yaml --tokens 1,16,128,1024 --budget 300 --out tuning
