build/moegen tune specs/mixtral-8x7b.yaml --tokens 1,16,128,1024 --budget 600 --out tuning
