-- simplepush's log events, counted for Heka's dashboard (a SandboxFilter over
-- the messages MozlogDecoder makes of simplepush.log).
--
-- Two outputs, every ticker_interval:
-- - "simplepush log events" (cbuf): events per row by severity, in the row
--   of the event's own Timestamp: errors (Severity 3 and below), warnings
--   (4), info (5 and 6), debug (7);
-- - "simplepush log events by Type" (tsv): Type, Severity and count of every
--   kind of event seen since hekad started, sorted by Type then Severity.
--
-- Config:
-- - sec_per_row (uint, default 5): seconds per row, as the graphs of metrics.
-- - rows (uint, default 720): rows kept (720 x 5 s: an hour).

require "circular_buffer"
require "string"
require "table"

local rows = read_config("rows") or 720
local sec_per_row = read_config("sec_per_row") or 5

events = circular_buffer.new(rows, 4, sec_per_row)
local ERRORS = events:set_header(1, "errors")
local WARNINGS = events:set_header(2, "warnings")
local INFO = events:set_header(3, "info")
local DEBUG = events:set_header(4, "debug")

-- counts["Type\tSeverity"] = events since start
counts = {}

local function column(severity)
    if severity <= 3 then return ERRORS end
    if severity == 4 then return WARNINGS end
    if severity <= 6 then return INFO end
    return DEBUG
end

function process_message()
    local severity = read_message("Severity")
    local type_ = read_message("Type")
    if type(severity) ~= "number" or type(type_) ~= "string" then return -1 end
    events:add(read_message("Timestamp"), column(severity), 1)
    local key = string.format("%s\t%d", type_, severity)
    counts[key] = (counts[key] or 0) + 1
    return 0
end

function timer_event(ns)
    inject_payload("cbuf", "simplepush log events", events)
    local keys = {}
    for key in pairs(counts) do keys[#keys + 1] = key end
    table.sort(keys)
    add_to_payload("Type\tSeverity\tcount\n")
    for _, key in ipairs(keys) do
        add_to_payload(key, "\t", counts[key], "\n")
    end
    inject_payload("tsv", "simplepush log events by Type")
end
